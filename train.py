"""Pretrain a GPT: python train.py configs/shakespeare.yaml [section.key=value ...]"""

import sys

from gpt.entry import main, parse_run_args
from gpt.config import PretrainConfig
from gpt.train.pretrain import pretrain

if __name__ == "__main__":
    main(lambda: pretrain(parse_run_args(PretrainConfig, sys.argv[1:], "train.py")))
