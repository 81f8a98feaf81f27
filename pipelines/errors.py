"""Errors the CLI turns into exit codes (see README: exit codes)."""


class InvalidInput(Exception):
    """Bad spec, data or URI: exit 2 with this message as one line."""

    exit_code = 2


class GateFailed(Exception):
    """A registration quality gate was not met: exit 3."""

    exit_code = 3


class StageFailed(Exception):
    """A stage job failed: exit 1 after its log tail is shown."""

    exit_code = 1
