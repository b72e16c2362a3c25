"""`vedrt train` / `vedrt eval` on tiny configs: a couple of steps write a checkpoint that
transformers loads, users' data is checked up front with one-line errors, and the loss is the
unshifted one (transformers 4.57 otherwise trains next-next-token prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vedrt.cli import main  # noqa: E402
from vedrt.data import scenes  # noqa: E402

TINY = [
    "--image-size",
    "16",
    "--patch-size",
    "2",
    "--window",
    "2",
    "--enc-hidden",
    "16",
    "--enc-layers",
    "1",
    "--dec-hidden",
    "16",
    "--dec-layers",
    "1",
    "--heads",
    "2",
    "--max-positions",
    "24",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--eval-steps",
    "2",
    "--valid-size",
    "4",
    "--workers",
    "0",
    "--threads",
    "1",
    "--vocab-size",
    "300",
]


@pytest.fixture(scope="module")
def scene_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "ckpt"
    assert main(["train", "--out", str(out), *TINY]) == 0
    return out


def _user_folder(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        scene = scenes.scene_at(5, i)
        scenes.render(scene, 40).save(root / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "caption": scene.caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_checkpoint_loads_with_transformers(scene_checkpoint: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(scene_checkpoint)
    tok = AutoTokenizer.from_pretrained(scene_checkpoint)
    proc = AutoImageProcessor.from_pretrained(scene_checkpoint)
    assert (scene_checkpoint / "generation_config.json").is_file()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.config.decoder_start_token_id == tok.bos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert (
        tok.decode(tok("a large red circle", add_special_tokens=False)["input_ids"])
        == "a large red circle"
    )
    image, _ = scenes.augmented_at(0, 0)
    ids = model.generate(
        pixel_values=proc(images=image, return_tensors="pt")["pixel_values"], max_new_tokens=3
    )
    assert ids.shape[0] == 1 and int(ids[0, 0]) == tok.bos_token_id
    info = json.loads((scene_checkpoint / "train_info.json").read_text())
    assert info["steps"] == 2 and "eval_exact_match" in info["final_eval"]


def test_loss_is_unshifted_cross_entropy() -> None:
    from vedrt.train import model as build

    tok = build.train_tokenizer(scenes.all_captions(), 300)
    m = build.model_from_configs(
        build.Sizes(
            encoder_type="vit",
            image_size=16,
            patch_size=8,
            enc_hidden=16,
            enc_layers=1,
            dec_hidden=16,
            dec_layers=1,
            heads=2,
        ),
        len(tok),
    )
    build.set_special_ids(m, tok, 24)
    build.fix_loss(m)
    labels = torch.randint(3, len(tok), (2, 5))
    out = m(pixel_values=torch.randn(2, 3, 16, 16), labels=labels)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, len(tok)), labels.reshape(-1))
    assert torch.allclose(out.loss, ce)


def _eval_losses(checkpoint: Path) -> list[float]:
    """The validation losses the trainer logged, in step order (from its resumable state)."""
    (state,) = (checkpoint / "trainer-state").glob("checkpoint-*/trainer_state.json")
    history = json.loads(state.read_text())["log_history"]
    return [
        entry["eval_loss"]
        for entry in sorted(history, key=lambda e: e["step"])
        if "eval_loss" in entry
    ]


@pytest.mark.filterwarnings("ignore:mtime may not be reliable")  # checkpoint rotation, harmless
def test_train_on_user_folder_lowers_the_loss(tmp_path: Path) -> None:
    """Training really learns: the validation loss after the last step is well below the first."""
    data = _user_folder(tmp_path / "data")
    out = tmp_path / "ckpt"
    args = [
        *TINY,
        "--steps",
        "24",
        "--eval-steps",
        "4",
        "--lr",
        "1e-2",
    ]  # later flags win: 6 evaluations
    assert main(["train", "--out", str(out), "--data", str(data), *args]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    losses = _eval_losses(out)
    assert len(losses) == 6, losses
    assert losses[-1] < 0.8 * losses[0], losses
    info = json.loads((out / "train_info.json").read_text())
    assert info["final_eval"]["eval_loss"] == pytest.approx(losses[-1], abs=1e-3)


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such file or folder"),
        ("no_jsonl", "has no captions.jsonl"),
        ("bad_json", "captions.jsonl:2: not valid JSON"),
        ("bad_row", "captions.jsonl:1: expected"),
        ("missing_image", "1 image(s) not found"),
        ("bad_coco", "not a COCO captions file"),
        ("corrupt_image", "1 image(s) cannot be read, first:"),  # was a traceback mid-training
    ],
)
def test_bad_data_is_one_line_error(tmp_path: Path, capsys, case: str, message: str) -> None:
    data = _user_folder(tmp_path / "data", 3)
    jsonl = data / "captions.jsonl"
    lines = jsonl.read_text().splitlines()
    target = data
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no_jsonl":
        jsonl.unlink()
    elif case == "bad_json":
        jsonl.write_text(lines[0] + "\n{oops\n")
    elif case == "bad_row":
        jsonl.write_text('{"image": 3}\n')
    elif case == "missing_image":
        (data / "img1.png").unlink()
    elif case == "bad_coco":
        target = data / "coco.json"
        target.write_text('{"images": []}')
    elif case == "corrupt_image":
        (data / "img1.png").write_bytes((data / "img1.png").read_bytes()[:60])
    assert main(["train", "--out", str(tmp_path / "o"), "--data", str(target), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_coco_loader(tmp_path: Path) -> None:
    from vedrt.train.data import load_captions

    _user_folder(tmp_path, 2)
    coco = {
        "images": [{"id": 7, "file_name": "img0.png"}, {"id": 8, "file_name": "img1.png"}],
        "annotations": [
            {"image_id": 7, "caption": "a"},
            {"image_id": 7, "caption": "b"},
            {"image_id": 8, "caption": "c"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    items = load_captions(tmp_path / "coco.json")
    assert [(i.image.name, i.caption) for i in items] == [
        ("img0.png", "a"),
        ("img0.png", "b"),
        ("img1.png", "c"),
    ]


def test_caption_scores() -> None:
    from vedrt.train.metrics import caption_scores

    s = caption_scores(
        ["a small red circle", "a large red circle"],
        [["a small red circle"], ["x", "a large red circle"]],
    )
    assert s["exact_match"] == 1.0 and s["bleu4"] == pytest.approx(100.0)
    assert caption_scores(["a small red circle"], ["a large blue square"])["exact_match"] == 0.0


def test_eval_runtime_matches_pytorch(scene_checkpoint: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnx")
    from vedrt.export import export_model

    export_model(scene_checkpoint, tmp_path / "export")
    report = tmp_path / "scores.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "export"),
                "--checkpoint",
                str(scene_checkpoint),
                "-n",
                "6",
                "--threads",
                "1",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    scores = json.loads(report.read_text())
    assert {(r["source"], r["decoding"]) for r in scores["rows"]} == {
        ("runtime:onnxruntime", "greedy"),
        ("runtime:onnxruntime", "beam4"),
        ("pytorch", "greedy"),
        ("pytorch", "beam4"),
    }
    assert all(v == 1.0 for v in scores["same_as_pytorch"].values()), scores


@pytest.mark.parametrize("encoder_type", ["beit", "vit", "swin"])
def test_every_encoder_type_builds_and_runs(encoder_type: str) -> None:
    from vedrt.train import model as build

    sizes = build.Sizes(
        encoder_type=encoder_type,
        image_size=16,
        patch_size=2 if encoder_type == "swin" else 8,
        window=2,
        enc_hidden=16,
        enc_layers=1,
        dec_hidden=16,
        dec_layers=1,
        heads=2,
    )
    m = build.model_from_configs(sizes, 40)
    assert m.config.encoder.model_type == encoder_type
    out = m(pixel_values=torch.randn(1, 3, 16, 16), decoder_input_ids=torch.tensor([[1, 5]]))
    assert out.logits.shape == (1, 2, 40)


def test_bad_sizes_are_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["train", "--out", str(tmp_path / "o"), *TINY, "--patch-size", "5"]) == 2
    assert "not a multiple of --patch-size" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "o"), *TINY, "--encoder-type", "convnext"]) == 2
    assert "--encoder-type must be" in capsys.readouterr().err


def test_train_from_pretrained_parts(tmp_path: Path) -> None:
    """`--encoder DIR --decoder DIR`: from_encoder_decoder_pretrained, the decoder's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    from vedrt.train import model as build

    tok = build.train_tokenizer(scenes.all_captions(), 300)
    enc = ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        add_pooling_layer=False,
    )
    dec = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=1, n_head=2, n_positions=64)
    )
    enc.save_pretrained(tmp_path / "enc")
    dec.save_pretrained(tmp_path / "dec")
    tok.save_pretrained(tmp_path / "dec")
    out = tmp_path / "ckpt"
    args = [
        "train",
        "--out",
        str(out),
        "--encoder",
        str(tmp_path / "enc"),
        "--decoder",
        str(tmp_path / "dec"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-steps",
        "2",
        "--valid-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(out)
    assert model.config.decoder.add_cross_attention and hasattr(model, "enc_to_dec_proj")
    assert (out / "preprocessor_config.json").is_file()


def test_train_refuses_bad_arguments_and_other_peoples_folders(tmp_path, capsys) -> None:
    """Checked before anything loads: OUT is never a folder of files vedrt train did not write
    (training replaces config.json, the weights and the tokenizer there), never an input."""
    from vedrt.cli import main

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--out", str(theirs)], "did not write"),
        (["--out", str(tmp_path / "a-file")], "a file, not a folder"),
        (["--out", str(tmp_path / "new"), "--steps", "0"], "--steps must be >= 1"),
        (["--out", str(tmp_path / "new"), "--lr", "-1"], "--lr must be > 0"),
        (["--out", str(tmp_path / "new"), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--out", str(tmp_path / "new"), "--task", "text", "--data", "x"], "scenes only"),
        (
            ["--out", str(theirs), "--encoder", str(theirs), "--decoder", str(theirs)],
            "did not write",
        ),
    ]
    for args, words in cases:
        assert main(["train", *args]) == 2, args
        assert words in capsys.readouterr().err, args
    assert (theirs / "config.json").read_text() == "{}"
    assert not (tmp_path / "new").exists()


def test_eval_scores_around_an_unreadable_image_and_checks_its_arguments(tmp_path, capsys) -> None:
    """A corrupt image is one error line, scored as wrong, and the others are scored (it ended
    the evaluation); arguments that would fail late, or be ignored, fail first."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    rows = [json.loads(x) for x in (root / "examples" / "captions.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for row in rows[:3]:
        shutil.copy(root / "examples" / row["image"], data / row["image"])
        lines.append(json.dumps(row))
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append(json.dumps({"image": "broken.png", "caption": "a small red circle"}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    report = tmp_path / "scores.json"
    assert main(["eval", "--data", str(data), "--beams", "1", "--json", str(report)]) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 image(s) could not be read" in captured.err
    assert json.loads(report.read_text())["rows"][0]["exact_match"] == pytest.approx(0.75)
    text_model = root / "vedrt" / "models" / "text"
    for args, words in (
        (
            ["--data", str(data), "--json", str(tmp_path / "x" / "s.json")],
            "not a file in an existing folder",
        ),
        (["--model", str(text_model), "--data", str(data)], "--data are for image models"),
        (["--plain", "--side", "-5"], "--side must be at least 8"),
    ):
        assert main(["eval", "--beams", "1", *args]) == 2, args
        assert words in capsys.readouterr().err, args


def test_training_that_fails_leaves_no_empty_folders(tmp_path: Path, monkeypatch) -> None:
    """A run stopped before its first save (an error, Ctrl-C) removes the folders it made and
    left empty, so the next `--out` is not a half-made "previous vedrt train output"."""

    def stopped(self, *args, **kwargs):
        (Path(self.args.output_dir)).mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.Seq2SeqTrainer, "train", stopped)
    data = _user_folder(tmp_path / "data")
    out = tmp_path / "ckpt"
    assert main(["train", "--out", str(out), "--data", str(data), *TINY, "--steps", "2"]) == 130
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "train_info.json").write_text("{}")  # a previous run's output: kept as it was
    assert main(["train", "--out", str(kept), "--data", str(data), *TINY, "--steps", "2"]) == 130
    assert sorted(p.name for p in kept.iterdir()) == ["train_info.json"]
