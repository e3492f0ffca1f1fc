"""Fine-tuning with images: JSONL picture parts, packing with multimodal positions, the traced-layout tower, the
frozen or trained tower, LoRA on its linears, export, gradients through the whole model against torch, and a tiny
model that learns to name colours."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("PIL")
torch = pytest.importorskip("torch")

import qwenjax  # noqa: E402
from qwenjax import _compat  # noqa: E402
from qwenjax.inputs import PackedVision, vision_inputs, vision_positions  # noqa: E402
from qwenjax.testing import make_vision_checkpoint  # noqa: E402
from qwenjax.train.data import DataError, PackedBatches, VisionData, pack_rows, read_jsonl  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _solid(path, colour, size, noise_seed=None):
    from PIL import Image

    pixels = np.broadcast_to(np.array(COLOURS[colour], np.uint8), (*size, 3)).copy()
    if noise_seed is not None:  # the same colour, never the same pixels
        rng = np.random.default_rng(noise_seed)
        pixels = np.clip(pixels.astype(int) + rng.integers(-25, 26, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _question(image, question="Colour?"):
    return [{"type": "image", "image": image}, {"type": "text", "text": question}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm-train")
    hf = make_vision_checkpoint(path, seed=7)
    return path, hf


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_packed_pictures_give_each_document_its_standalone_logits(checkpoint, tmp_path):
    """A packed row of three conversations (two images of different grids; a video of frame files; text alone)
    through the training path (traced patch layout, packed positions, segment ids) gives every document the
    logits that `m(**processor(conversation))` gives it alone."""
    path, _ = checkpoint
    data = tmp_path / "data"
    _solid(data / "pics" / "a.png", "red", (16, 16), noise_seed=1)
    _solid(data / "pics" / "b.png", "blue", (24, 16), noise_seed=2)
    for i in range(4):
        _solid(data / "clip" / f"{i:03d}.png", "green", (16, 24), noise_seed=10 + i)
    conversations = [
        [{"role": "user", "content": _question("pics/a.png", "Two?") + _question("pics/b.png")},
         {"role": "assistant", "content": "red, blue"}],
        [{"role": "user", "content": "No picture"}, {"role": "assistant", "content": "fine"}],
        [{"role": "user", "content": [{"type": "video", "video": "clip"}, {"type": "text", "text": "What?"}]},
         {"role": "assistant", "content": "green"}],
    ]
    jsonl = _write_jsonl(data / "train.jsonl", [{"messages": c} for c in conversations])
    m = qwenjax.from_pretrained(path, dtype="float32")
    processor = qwenjax.load_processor(path)
    vision = VisionData(processor, m.config)
    samples, problems = read_jsonl(jsonl, processor.tokenizer, max_len=512, vision=vision)
    assert not problems and [len(s.pictures) for s in samples] == [2, 0, 1]
    assert [p.grid for p in samples[0].pictures] == [(1, 4, 4), (1, 6, 4)]
    pads = (samples[0].ids == m.config.image_token_id)
    assert pads.sum() == 4 + 6 and not samples[0].loss_mask[pads].any()  # pad tokens are never targets

    batch, _ = next(iter(PackedBatches(samples, pack_len=512, rows=1, vision=vision)))
    assert batch["positions"].shape == (1, 3, 1, 512) and isinstance(batch["vision"], PackedVision)
    mb = jax.tree.map(lambda x: x[0], batch)

    @jax.jit
    def packed_logits(params, mb):
        model = nnx.merge(m.graphdef, params)
        return model(mb["input_ids"], attention_mask=mb["attention_mask"], segment_ids=mb["segment_ids"],
                     positions=mb["positions"], vision=mb["vision"])

    got = np.asarray(packed_logits(m.params, mb))[0]
    at = 0
    for sample in pack_rows(samples, 512, seed=0, epoch=0)[0]:
        conversation = conversations[sample.line - 1]
        messages = [{**msg, "content": [{**part, part["type"]: str(data / part[part["type"]])}
                                        if part.get("type") in ("image", "video") else part
                                        for part in msg["content"]]} if isinstance(msg["content"], list) else msg
                    for msg in conversation]
        alone = processor(messages, add_generation_prompt=False)
        n = len(sample.ids)
        assert np.array_equal(mb["input_ids"][0, at:at + n], alone["input_ids"][0])
        want = np.asarray(m(**alone))[0]
        np.testing.assert_allclose(got[at:at + n], want, atol=1e-4, rtol=0)
        at += n


def test_picture_problems_are_named_with_their_line(checkpoint, tmp_path):
    path, _ = checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    processor = qwenjax.load_processor(path)
    _solid(tmp_path / "ok.png", "red", (16, 16))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    answer = {"role": "assistant", "content": "x"}
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": _question("missing.png")}, answer]},
        {"messages": [{"role": "user", "content": _question("broken.png")}, answer]},
        {"messages": [{"role": "user", "content": [{"type": "picture", "picture": "ok.png"}]}, answer]},
        {"messages": [{"role": "user", "content": _question("ok.png")}, answer]},
    ])
    samples, problems = read_jsonl(jsonl, processor.tokenizer, max_len=256, vision=VisionData(processor, m.config))
    assert [s.line for s in samples] == [4]
    assert problems[0].startswith(f"{jsonl}:1: ") and str(tmp_path / "missing.png") in problems[0]
    assert problems[1].startswith(f"{jsonl}:2: ") and str(tmp_path / "broken.png") in problems[1]
    assert problems[2].startswith(f"{jsonl}:3: messages[0].content[0]")
    # a text-only model (no VisionData) names the message that holds parts
    with pytest.raises(DataError, match=r"d.jsonl:1: message 0 has a list of parts .* vision tower"):
        read_jsonl(jsonl, processor.tokenizer, max_len=256, strict=True)


def test_vision_gradients_through_the_whole_model_match_torch(checkpoint):
    """d(mean next-token loss)/d(every parameter), the vision tower's included, through the features' scatter into
    the language model and its multimodal positions, against torch autograd, relative 1e-4."""
    from qwenjax.testing import gradient_errors
    from qwenjax.train.loss import next_token_loss

    path, hf = checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    cfg, rng = m.config, np.random.default_rng(3)
    grids = np.array([[1, 4, 4], [1, 2, 6]])
    pads = [cfg.image_token_id] * 4, [cfg.image_token_id] * 3
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = np.array([list(rng.integers(0, 250, 3)) + [start, *pads[0], end] + list(rng.integers(0, 250, 4)) +
                    [start, *pads[1], end] + list(rng.integers(0, 250, 5))])
    mask = np.ones_like(ids)
    pixels = rng.normal(size=(int(np.prod(grids, axis=1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    vision = vision_inputs(cfg, ids, mask, pixels, grids)
    positions, _ = vision_positions(cfg, ids, mask, vision)

    def loss(params):
        model = nnx.merge(m.graphdef, params)
        total, count = next_token_loss(model(ids, positions=positions, vision=vision), ids)
        return total / count

    got = jax.jit(jax.grad(loss))(m.params)
    hf.zero_grad()
    out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(ids),
             pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grids),
             mm_token_type_ids=torch.as_tensor((ids == cfg.image_token_id).astype(np.int64)))
    out.loss.backward()
    grads = {k.removeprefix("model.").removeprefix("language_model."): p.grad.numpy()
             for k, p in hf.named_parameters()}
    want = _compat.replace_values(got, lambda p, _: grads[".".join(map(str, p))])  # checkpoint names: 1:1
    per, overall = gradient_errors(got, want)
    visual = {k: v for k, v in per.items() if k.startswith("visual.")}
    assert len(visual) == len([k for k in grads if k.startswith("visual.")]) > 10
    worst = max(per, key=per.get)
    print(f"gradients: worst relative error {per[worst]:.2e} ({worst}); overall {overall:.2e}")
    assert per[worst] < 1e-4, (worst, per[worst])


def _colour_data(root, n_per_colour, seed, sizes=((16, 16), (24, 16), (16, 24))):
    """JSONL of one question per solid (lightly noisy) image: "Colour?" → its colour's name."""
    records, rng = [], np.random.default_rng(seed)
    for i in range(n_per_colour):
        for colour in COLOURS:
            size = sizes[int(rng.integers(len(sizes)))]
            name = f"pics/{colour}-{seed}-{i}.png"
            _solid(root / name, colour, size, noise_seed=int(rng.integers(1 << 30)))
            records.append({"messages": [{"role": "user", "content": _question(name)},
                                         {"role": "assistant", "content": colour}]})
    return _write_jsonl(root / "colours.jsonl", records)


def _answer(m, processor, image):
    """Greedy answer to "Colour?" in the training data's format: the template writes the last assistant turn
    after an empty thinking block, as Qwen3.5's does (and as its generation prompt with thinking off ends)."""
    from qwenjax.inference.processor import IMAGE_PLACEHOLDER

    prompt = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Colour?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    batch = processor(text=prompt, images=[str(image)])
    out = qwenjax.generate(m, batch["input_ids"], pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"], max_new_tokens=8, temperature=0.0,
                           eos_token_ids=[processor.tokenizer.token_to_id("<|im_end|>")])
    return processor.tokenizer.decode(out[0]).strip()


def test_a_tiny_model_learns_to_name_the_colour_of_an_image(checkpoint, tmp_path):
    """With the tower trained, the loss on the answers falls below 0.05 nats per token, the tower's weights move,
    and held-out images (new noise, new sizes) are named right."""
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    path, _ = checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    processor = qwenjax.load_processor(path)
    data = _colour_data(tmp_path / "data", n_per_colour=6, seed=0)
    train = TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60, weight_decay=0.0, train_vision=True)
    history = finetune(m, processor.tokenizer, data, tmp_path / "run", train=train,
                       run=RunConfig(pack_len=256, rows=2, save_every=1000), progress=False)
    last = np.mean([h["loss"] for h in history[-5:]])
    print(f"loss: first {history[0]['loss']:.3f}, last 5 steps {last:.4f}")
    assert history[0]["loss"] > 1.0 and last < 0.05
    before, after = _visual_tensors(path), _visual_tensors(tmp_path / "run" / "export")
    assert before.keys() == after.keys()
    assert all(not np.array_equal(before[k], after[k]) for k in before if k.endswith("weight") and "norm" not in k)
    trained = qwenjax.from_pretrained(tmp_path / "run" / "export", dtype="float32")
    held_out = tmp_path / "held"
    right = 0
    for i, colour in enumerate(COLOURS):
        image = _solid(held_out / f"{colour}.png", colour, (20, 20), noise_seed=1000 + i)
        right += _answer(trained, processor, image) == colour
    assert right == len(COLOURS), right


def _visual_tensors(directory):
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(file).items() if k.startswith("model.visual.")})
    return out


def test_the_tower_is_frozen_by_default_and_lora_can_target_it(checkpoint, tmp_path):
    """Frozen: the export's model.visual.* tensors are the source's, byte for byte. LoRA on the tower's
    linears: they move (merged), the rest of the tower does not."""
    from qwenjax.train.lora import VISION_TARGETS, LoRAConfig
    from qwenjax.train.loop import RunConfig, finetune
    from qwenjax.train.step import TrainConfig

    path, _ = checkpoint
    m = qwenjax.from_pretrained(path, dtype="float32")
    processor = qwenjax.load_processor(path)
    data = _colour_data(tmp_path / "data", n_per_colour=2, seed=1)
    train = TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=2)
    run = RunConfig(pack_len=256, rows=2, save_every=1000)
    source = _visual_tensors(path)
    finetune(m, processor.tokenizer, data, tmp_path / "frozen", train=train, run=run, progress=False)
    frozen = _visual_tensors(tmp_path / "frozen" / "export")
    assert frozen.keys() == source.keys() and all(frozen[k].tobytes() == source[k].tobytes() for k in source)

    lora = LoRAConfig(rank=2, alpha=4.0, targets=VISION_TARGETS)
    m = qwenjax.from_pretrained(path, dtype="float32")  # the first run took the weights' arrays
    finetune(m, processor.tokenizer, data, tmp_path / "lora", train=train, run=run, lora=lora, progress=False)
    adapted = _visual_tensors(tmp_path / "lora" / "export")
    moved = {k for k in source if not np.array_equal(adapted[k], source[k])}
    linears = {k for k in source if k.endswith(".weight") and k.split(".")[-2] in VISION_TARGETS}
    assert moved == linears - {"model.visual.patch_embed.proj.weight"}  # the patch Conv3d is no Linear
