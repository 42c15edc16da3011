"""dbscale's own error types.

Every failure a user can cause (a bad config, a run directory from another run, a truncated checkpoint)
raises a subclass of `DbscaleError` whose message names the file, the field and the fix. Entry points
print the message alone, without a traceback.
"""


class DbscaleError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(DbscaleError):
    """A config file or override is malformed or invalid."""


class RunError(DbscaleError):
    """A run directory is missing, incomplete, or does not match what is expected."""


class CheckpointError(DbscaleError):
    """A checkpoint is missing, truncated, unfinished, or from another run."""


class DataError(DbscaleError):
    """A corpus, tokenizer or shard is missing, empty or inconsistent."""


class GenerationError(DbscaleError):
    """A prompt or generation setting cannot be served by the model."""


def cli_main(main):
    """Run an entry point: a DbscaleError prints one actionable line (no traceback) and exits 2."""
    import sys

    try:
        code = main()
    except DbscaleError as e:
        print(f"dbscale: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("dbscale: interrupted; files are written whole or not at all, rerun to continue.", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
