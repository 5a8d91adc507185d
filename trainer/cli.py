"""Entry-point wrapper: a user mistake ends in one line on stderr saying what is wrong, not a traceback."""
import sys

from dataset.lm_dataset import DataError
from dataset.processing import ImageError
from model.weights import WeightsMismatchError

from .training import CheckpointSaveError, TrainingStopped

# Errors that describe bad input (a path, a flag, a file's content); anything else is a bug and keeps its
# traceback.
USER_ERRORS = (DataError, ImageError, WeightsMismatchError, FileNotFoundError, CheckpointSaveError)


def run_cli(main, argv=None):
    try:
        main(argv)
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except USER_ERRORS as error:
        first, _, rest = str(error).partition("\n")
        print(f"error: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
