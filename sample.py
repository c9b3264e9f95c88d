"""Sample from a checkpoint: python sample.py --ckpt out/shakespeare [--prompt TEXT] [--chat] ...

All flags: python sample.py --help. The engine is gpt/infer/engine.py; this script only parses arguments.
"""

import sys

from gpt.entry import main
from gpt.infer.sample_cli import run

if __name__ == "__main__":
    main(lambda: run(sys.argv[1:]))
