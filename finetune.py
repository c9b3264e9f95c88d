"""Fine-tune a GPT on your own records: python finetune.py configs/sft_qa.yaml [section.key=value ...]"""

import sys

from gpt.entry import main, parse_run_args
from gpt.config import FinetuneConfig
from gpt.train.sft import finetune

if __name__ == "__main__":
    main(lambda: finetune(parse_run_args(FinetuneConfig, sys.argv[1:], "finetune.py")))
