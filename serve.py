"""Serve a checkpoint with OpenAI's API: python serve.py --ckpt out/sft_qa [--port 8000] [--api-key KEY]

All flags: python serve.py --help. The server is gpt/serve/; this script only parses arguments.
"""

import sys

from gpt.entry import main
from gpt.serve.serve_cli import run

if __name__ == "__main__":
    main(lambda: run(sys.argv[1:]))
