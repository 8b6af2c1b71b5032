"""`edge-nas remote` option checks that need no broker."""
from click.testing import CliRunner

from edge_runtime.cli import main


def test_wait_timeout_needs_wait():
    result = CliRunner().invoke(main, ["remote", "personalize", "--broker", "mqtt://127.0.0.1:1", "--device", "dev1",
                                       "--wait-timeout", "5"])
    assert result.exit_code == 2
    assert "--wait-timeout only applies with --wait" in result.output
