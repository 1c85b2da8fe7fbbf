"""How a test checks the CLI's contract for bad input: exit code 2 and one line on stderr."""

from badexpert.main import main


def run_error(capsys, argv) -> str:
    """Run ``badexpert argv``; assert exit 2 with a one-line ``badexpert: error: ...``; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("badexpert: error: ") and "Traceback" not in err
    return err
