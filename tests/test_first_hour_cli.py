"""What a new user sees (issue #17): a site the model never reads is refused (LLaVA's image.-1), warnings are one
``warning: ...`` line, and commands end with their result and the next command."""
from __future__ import annotations

import warnings

import click
import pytest

from debias_export.cli.eval import headline
from debias_export.cli.main import cli, main
from debias_export.workflow.testing import random_sae


def run(argv: list[str], capsys) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip().splitlines()


@pytest.fixture
def llava_sae(tmp_path):
    sae = random_sae(32, 128)  # tiny-llava's vision tower is 32 wide, 3 blocks, vision_feature_layer -2
    sae.save(tmp_path / "sae")
    return tmp_path / "sae"


def test_patch_refuses_a_block_llava_never_reads(tmp_path, llava_sae, capsys):
    argv = ["patch", "--model", "tiny-llava", "--sae", str(llava_sae), "--site", "image.-1", "--neurons", "1,2",
            "--out", str(tmp_path / "edit")]
    rc, out, err = run(argv, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: site image.2") and "is never read" in err[0]
    assert "up to block 1 (image.1, vision_feature_layer -2)" in err[0] and "--allow-unread-site" in err[0]
    assert not (tmp_path / "edit").exists()


def test_patch_with_the_override_warns_once_on_one_line(tmp_path, llava_sae, capsys):
    argv = ["patch", "--model", "tiny-llava", "--sae", str(llava_sae), "--site", "image.-1", "--neurons", "1,2",
            "--out", str(tmp_path / "edit"), "--allow-unread-site"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert len([line for line in err if line.startswith("warning: ")]) == 1, err
    assert not any("UserWarning" in line for line in err)
    assert out[0].startswith("saved reconstruct edit of 2 neuron(s) (1, 2) at image.2")
    assert out[-1].startswith(f"next: debias-export export --model tiny-llava --edit {tmp_path / 'edit'}")


def test_patch_at_the_block_llava_reads_says_nothing(tmp_path, llava_sae, capsys):
    argv = ["patch", "--model", "tiny-llava", "--sae", str(llava_sae), "--site", "image.-2", "--neurons", "1",
            "--out", str(tmp_path / "edit")]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and not [line for line in err if "warning" in line], err


def test_python_warnings_are_one_cli_line(capsys):
    @click.command("warn-once")
    def warn_once():
        warnings.warn("first line of a library warning\nsecond line", UserWarning)

    cli.add_command(warn_once)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            rc, out, err = run(["warn-once"], capsys)
    finally:
        cli.commands.pop("warn-once")
    assert rc == 0 and err == ["warning: first line of a library warning"]


def test_the_eval_headline_leads_with_the_numbers():
    gender = lambda skew: {"gender": {"max_skew": skew}}  # noqa: E731
    compared = {"base": {"retrieval": {"occupations": gender(0.2)}}, "patched": {"retrieval": {"occupations": gender(0.15)}},
                "bias_change": {"occupations": {"gender": {"change": -0.25, "ci_low": -0.4, "ci_high": -0.1}}},
                "fidelity": {"image_cosine": {"mean": 0.97}}}
    assert headline(compared, 50) == ("gender MaxSkew@50: occupations 0.200 -> 0.150 (-25.0% [-40%, -10%]); "
                                      "image embedding cosine 0.970")
    single = {"retrieval": {"occupations": gender(0.2), "adjectives": gender(0.1)}, "utility": {"gender_zero_shot_acc": 0.6}}
    assert headline(single, 10) == "gender MaxSkew@10: occupations 0.200; adjectives 0.100; gender zero-shot accuracy 0.600"
    sweep = [{"alpha": a, "retrieval": {"occupations": gender(s)}} for a, s in ((0.0, 0.2), (1.0, 0.1))]
    assert headline(sweep, 10) == "gender MaxSkew@10 (occupations) along the sweep: a=0: 0.200, a=1: 0.100"
    assert headline({"metric": "vla", "base": {"disproportion_rate": 0.5}, "patched": {"disproportion_rate": 0.25}}, 10) == \
        "gender disproportion rate 0.500 -> 0.250"
    assert headline({"unexpected": 1}, 10) == "evaluation finished"


def test_capture_at_a_block_llava_never_reads_warns_on_one_line(tmp_path, capsys):
    argv = ["capture", "--model", "tiny-llava", "--site", "image.-1", "--images", "fairface540/labels.csv",
            "--limit", "2", "--out", str(tmp_path / "cap"), "--no-progress"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    warned = [line for line in err if line.startswith("warning: ")]
    assert len(warned) == 1 and "is never read" in warned[0], err
    assert (tmp_path / "cap" / "capture.json").exists()
