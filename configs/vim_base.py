"""python -m vitvq.main --config=configs/vim_base.py --workdir=DIR --config.tokenizer_bundle=BUNDLE

VIM-Base (docs/paper.md table 2) over the codes of a frozen ViT-VQGAN (the paper uses
the SS tokenizer, configs/vitvq_small.py, exported with python -m vitvq.export), class-
conditional on ImageNet 256x256 with the paper's hyperparameters: Adam b1 0.9 b2 0.96, batch
1024, 450k steps, warmup to 4.5e-4 over 5k steps, exponential decay to 1e-5 from step 80k.
Labels are never dropped (`class_dropout=0`), as in the paper. Variants, comma-separated:

    --config=configs/vim_base.py:cfg     # 10% of labels dropped, for classifier-free guidance
    --config=configs/vim_base.py:uncond  # unconditional (the paper's linear-probe models)

    python -m vitvq.main --config=configs/vim_base.py:runlocal --workdir=DIR \
        --config.tokenizer_bundle=DIGITS_BUNDLE     # tiny, seconds on a CPU, bundled digits

Where it departs from the paper: nothing in the recipe; the paper's tokenizer is the SS
model, whose stage-1 defaults here depart from the paper (configs/vitvq_small.py says how).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import common  # noqa: E402


def get_config(arg=None):
    return common.imagenet_stage2("base", arg)
