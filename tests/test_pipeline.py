"""The demo pipeline (configs/demo.py): tokenizer -> bundle -> VIM -> bundle -> samples."""

import importlib.util
import json
import pathlib

from PIL import Image

import vitvq
from vitvq.train import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config(steps: int):
    spec = importlib.util.spec_from_file_location("demo", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.update(total_steps=steps, eval_every_steps=steps, checkpoint_every_steps=steps)
    # 8 fake devices: eval batches must divide over them (the demo's 99 does not).
    c.update(image_every_steps=steps, log_every_steps=steps, eval_num_examples=96)
    c.update(eval_batch_size=32)
    # The GAN phase stays off (one compiled stage-1 step): tests/test_main.py's CLI run and
    # tests/test_train_stage1.py cover it.
    c.loss.disc_start_step = 10 * steps
    c.vim.update(total_steps=steps, eval_every_steps=steps, checkpoint_every_steps=steps)
    c.vim.update(image_every_steps=steps, log_every_steps=steps, eval_num_examples=96)
    c.vim.update(eval_batch_size=32)
    c.vim.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.vim.sampling.num_per_class = 3
    return c


def test_demo_pipeline_writes_bundle_and_images(tmp_path, capsys):
    config = demo_config(4)
    result = pipeline.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    for stage in (
        "[1/5]",
        "[2/5]",
        "[3/5]",
        "[4/5]",
        "[5/5]",
        "samples recognized",
        "with rejection",
    ):
        assert stage in out
    final = json.loads(out.strip().splitlines()[-1])["final_eval"]
    assert final == result
    # Between the stages, each stage's readable eval line; the JSON summary only at the end.
    assert [line.startswith('{"final_eval"') for line in out.splitlines()].count(True) == 1
    assert "tokenizer eval @ 4:" in out and "VIM eval @ 4:" in out
    assert 0.0 <= result["samples/recognized"] <= 1.0
    assert result["samples/real_top1"] > 0.85  # the judge itself works on real digits
    assert result["samples/rejecter_real_top1"] > 0.8  # and so does the rejecting classifier
    assert 0.0 <= result["samples/recognized_with_rejection"] <= 1.0
    assert result["probe/pixels_top1"] > 0.85
    for name in ("tokenizer/psnr", "vim/loss", "probe/vim_top1"):
        assert name in result
    with Image.open(tmp_path / "samples.png") as image:  # 10 rows of 3 samples, named
        width, height = image.size
        assert height == 10 * 34 - 2 and 3 * 34 - 2 + 8 <= width <= 3 * 34 - 2 + 40
    with Image.open(tmp_path / "reconstructions.png") as image:  # 16 originals over recons
        width, height = image.size  # + the row names on the left, the PSNRs below
        assert 16 * 34 - 2 + 8 <= width <= 16 * 34 - 2 + 80 and 2 * 34 - 2 < height < 2 * 34 + 30
    for run in ("tokenizer", "vim"):  # each run drew its curves at its evaluations
        with Image.open(tmp_path / run / "curves.png") as image:
            assert image.size[0] > 2 * image.size[1]
    sampler = vitvq.load_sampler(tmp_path / "bundle")
    assert sampler.num_classes == 10 and sampler.class_names == [str(i) for i in range(10)]
    assert (tmp_path / "tokenizer" / "checkpoints").is_dir()
    assert (tmp_path / "vim" / "checkpoints").is_dir()
