"""The ``badexpert`` command, above both halves: :mod:`defense` (the offline job) and :mod:`service`
(the server). One module per subcommand; :mod:`badexpert.main` assembles the parser. A subcommand
parses its options, calls the library (the offline ones :class:`defense.Bundle`, the public API)
and prints: the work, its checks and their messages are the library's.

Nothing in ``defense`` or ``service`` imports this package.
"""
