"""The ``badexpert`` command, above both halves: :mod:`defense` (the offline job) and :mod:`service`
(the server). One module per subcommand; :mod:`badexpert.main` assembles the parser.

Nothing in ``defense`` or ``service`` imports this package.
"""
