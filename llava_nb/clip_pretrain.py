"""The offline CLIP twin, pretrained here: both towers, CLIP's contrastive loss on image/caption pairs, and
a patch objective for the tokens LLaVA reads.

The pairs are drawn scenes (`synthetic.draw_scene`) and captions that name every object's size, colour,
shape and side (`synthetic.clip_caption`), never stored: each step draws a fresh batch from a seeded
stream. Each image is matched against its own caption, the other captions of the batch, and a hard
negative of every caption (two objects' colours or shapes swapped, or one attribute changed), so the
tower has to bind colour and shape to the same object instead of listing the colours it sees.

The contrastive loss trains the pooled CLS token only, and LLaVA drops CLS: it reads the patch tokens of
the penultimate layer (`PATCH_LAYER`), which that loss alone does not teach where each colour and shape
is. So a linear read-out on those patch tokens is trained beside it (`patch_loss`, weighted
`ClipConfig.patch_weight`) to say, per 32-px patch, which share of its pixels shows the background or an
object of each colour, shape, side and size (`patch_targets`): dense supervision, as a segmentation head
gives, from the drawing's own object map; and, on every patch, how many objects the scene holds. It is
dropped afterwards; the checkpoint is a plain CLIPModel. What each choice measured, and when:
docs/offline-profile.md.

The result is saved as openai's checkpoint is (`pytorch_model.bin` with the text and vision keys,
`config.json`, `preprocessor_config.json`), plus `words.json` (its 20-word vocabulary) and
`pretraining.json` (settings, loss curve, held-out zero-shot and patch accuracy, seconds).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import config as cfg
from . import synthetic
from .device import cpu_has_bf16

SPECIALS = ("<pad>", "<bos>", "<unk>", "<eos>")  # eos is not id 2: CLIP pools id 2 the legacy way (argmax)
VOCAB = (
    *SPECIALS,
    "a",
    "and",
    "on",
    "the",
    "small",
    "large",
    "left",
    "right",
    *synthetic.COLOURS,
    *synthetic.SHAPES,
)
PAD, BOS, UNK, EOS = range(4)
MAX_TOKENS = 32  # the longest caption (three objects) is 25 tokens with <bos> and <eos>
VOCAB_FILE = "words.json"  # not vocab.json: transformers would take it for a BPE tokenizer
RECORD_FILE = "pretraining.json"
_IDS = {w: i for i, w in enumerate(VOCAB)}
PATCH = 32  # ViT-B/32's patch: a 7 x 7 grid at 224 px
PATCH_LAYER = -2  # the hidden state LLaVA reads (vision_feature_layer)
PATCH_CLASSES = {
    "colour": (None, *synthetic.COLOURS),
    "shape": (None, *synthetic.SHAPES),
    "side": (None, "left", "right"),
    "size": (None, "small", "large"),
    "count": (None, *range(1, synthetic.MAX_OBJECTS + 1)),
}  # the scene's, on every patch
SCENE_ATTRIBUTES = ("count",)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # openai CLIP's pixel normalisation
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_config(c: cfg.ClipConfig):
    """A CLIPConfig with ViT-B/32's patching (224 px, 32-px patches) and the twin's widths and depths."""
    from transformers import CLIPConfig

    vision = dict(
        hidden_size=c.vision_width,
        intermediate_size=4 * c.vision_width,
        num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads,
        image_size=synthetic.IMAGE_SIZE,
        patch_size=32,
        projection_dim=c.projection_dim,
        hidden_act="quick_gelu",
    )
    text = dict(
        hidden_size=c.text_width,
        intermediate_size=4 * c.text_width,
        num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads,
        vocab_size=len(VOCAB),
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        projection_dim=c.projection_dim,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.projection_dim)


def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
    """Word ids with <bos> and <eos>, padded to the longest: {'input_ids', 'attention_mask'}, each (N, T)."""
    rows = [[BOS, *(_IDS.get(w, UNK) for w in c.lower().replace(",", " ").split()), EOS] for c in captions]
    if max(map(len, rows)) > MAX_TOKENS:
        raise ValueError(f"a caption is longer than {MAX_TOKENS} tokens: {max(captions, key=len)!r}")
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def pixels(images) -> torch.Tensor:
    """224 x 224 RGB images as CLIP's normalised pixel_values (N, 3, 224, 224), as its processor computes."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
    x = x.permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def hard_negative(scene: list[dict], rng: np.random.Generator) -> list[dict]:
    """The scene with one binding broken: two objects swap colour or shape, or one's colour, shape or side."""
    scene = [dict(o) for o in scene]
    moves = ["side", "colour"] + (["swap colour", "swap shape"] * 2 if len(scene) > 1 else [])
    if len(scene) < len(synthetic.SHAPES):
        moves.append("shape")
    move = moves[int(rng.integers(len(moves)))]
    i, j = (int(k) for k in rng.permutation(len(scene))[:2]) if len(scene) > 1 else (0, 0)
    if move.startswith("swap"):
        key = move.split()[1]
        scene[i][key], scene[j][key] = scene[j][key], scene[i][key]
    elif move == "side":
        scene[i]["side"] = "right" if scene[i]["side"] == "left" else "left"
    else:
        pool = synthetic.COLOURS if move == "colour" else synthetic.SHAPES
        unused = [v for v in pool if v not in {o[move] for o in scene}]
        scene[i][move] = unused[int(rng.integers(len(unused)))]
    return scene


def draw_batch(rng: np.random.Generator, n: int) -> tuple[list, list[str], list[str], list[list[dict]]]:
    """`n` scenes: (images, their captions, a hard negative caption for each, the scenes)."""
    images, positives, negatives, scenes = [], [], [], []
    for _ in range(n):
        image, scene = synthetic.draw_scene(rng)
        images.append(image)
        positives.append(synthetic.clip_caption(scene))
        negatives.append(synthetic.clip_caption(hard_negative(scene, rng)))
        scenes.append(scene)
    return images, positives, negatives, scenes


def patch_targets(scenes: list[list[dict]]) -> torch.Tensor:
    """(N, 49, sum of PATCH_CLASSES) soft targets: for each 32-px patch and each attribute, the share of its
    pixels that show the background (class 0) or an object with that colour, shape, side or size; and, the
    same on every patch, how many objects the scene holds (`SCENE_ATTRIBUTES`)."""
    grid = synthetic.IMAGE_SIZE // PATCH
    offsets = np.cumsum([0, *(len(v) for v in PATCH_CLASSES.values())])
    out = np.zeros((len(scenes), grid * grid, offsets[-1]), dtype=np.float32)
    for i, scene in enumerate(scenes):
        owner = synthetic.object_map(scene).reshape(grid, PATCH, grid, PATCH)
        for k in range(len(scene) + 1):
            share = (owner == k).mean(axis=(1, 3)).reshape(-1)  # (49,)
            if not share.any():
                continue
            obj = scene[k - 1] if k else None
            for (attr, classes), offset in zip(PATCH_CLASSES.items(), offsets):
                if attr not in SCENE_ATTRIBUTES:
                    out[i, :, offset + classes.index(_attribute(obj, attr))] += share
        out[i, :, offsets[list(PATCH_CLASSES).index("count")] + len(scene)] = 1.0
    return torch.from_numpy(out)


def _attribute(obj: dict | None, attr: str) -> str | None:
    if obj is None:
        return None
    if attr == "size":
        return "large" if obj["box"][2] - obj["box"][0] >= synthetic.LARGE else "small"
    return obj[attr]


def patch_heads(c: cfg.ClipConfig) -> torch.nn.Linear:
    """The patch objective's linear read-out (dropped after pretraining): width -> all attributes' classes"""
    return torch.nn.Linear(c.vision_width, sum(len(v) for v in PATCH_CLASSES.values()))


def patch_loss(logits: torch.Tensor, targets: torch.Tensor, scene_weight: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy per attribute, summed over the attributes (`SCENE_ATTRIBUTES` x `scene_weight`),
    averaged over patches and images."""
    total, start = logits.new_zeros(()), 0
    for attr, classes in PATCH_CLASSES.items():
        part = slice(start, start + len(classes))
        ce = -(targets[..., part] * F.log_softmax(logits[..., part].float(), -1)).sum(-1).mean()
        total = total + ce * (scene_weight if attr in SCENE_ATTRIBUTES else 1.0)
        start += len(classes)
    return total


def contrastive_loss(
    model,
    images,
    positives: list[str],
    negatives: list[str],
    scenes: list[list[dict]] | None = None,
    heads: torch.nn.Module | None = None,
    patch_weight: float = 0.0,
    scene_weight: float = 1.0,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with each image also scored against every hard negative caption; plus,
    with `heads`, `patch_weight` x the patch objective on the layer LLaVA reads (`PATCH_LAYER`, no CLS)."""
    text = {k: v.to(model.device) for k, v in tokenize(positives + negatives).items()}
    out = model(pixel_values=pixels(images).to(model.device), output_hidden_states=heads is not None, **text)
    logits = out.logits_per_image  # (B, 2B): the B captions, then the B negatives
    target = torch.arange(len(images), device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(images)].T, target)) / 2
    if heads is None or not patch_weight:
        return loss
    patches = out.vision_model_output.hidden_states[PATCH_LAYER][:, 1:]
    targets = patch_targets(scenes).to(patches.device)
    return loss + patch_weight * patch_loss(heads(patches), targets, scene_weight)


def pretrain(
    c: cfg.ClipConfig,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
    device: str | None = None,
):
    """Train a CLIPModel from a seeded init on `c.steps` fresh batches; returns (model on the CPU, eval mode,
    and its record).

    On a GPU when there is one, else on the CPU (bf16 autocast where the CPU has bf16 instructions);
    the same seed gives the same weights on the same machine."""
    from transformers import CLIPModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(c.seed)
    model = CLIPModel(clip_config(c)).to(device).train()
    if c.position_std:  # position embeddings as large as the patches': "where" survives the first LayerNorm
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.weight.normal_(0.0, c.position_std)
    heads = patch_heads(c).to(device)
    params = [*model.named_parameters(), *(("patch_heads." + n, p) for n, p in heads.named_parameters())]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=c.learning_rate,
    )

    def lr_at(step: int) -> float:  # linear warmup, then cosine to min_lr
        if step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.min_lr + (c.learning_rate - c.min_lr) * (1 + math.cos(math.pi * t)) / 2

    rng = np.random.default_rng([c.seed, 0])  # the training stream; held-out scenes come from [seed, 1]
    bf16 = device == "cpu" and c.cpu_bf16 and cpu_has_bf16()  # 4x faster on such a CPU; weights stay fp32
    losses, start = [], time.perf_counter()
    for step in range(c.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = contrastive_loss(
                model,
                *draw_batch(rng, c.batch_size),
                heads=heads,
                patch_weight=c.patch_weight,
                scene_weight=c.scene_weight,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # as CLIP: the temperature never goes below 1/100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(round(loss.item(), 4))
        if progress and ((step + 1) % log_every == 0 or step + 1 == c.steps):
            progress(
                f"CLIP pretraining step {step + 1}/{c.steps}: loss {np.mean(losses[-log_every:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    record = {
        "settings": {k: getattr(c, k) for k in c.__dataclass_fields__},
        "bf16": bf16,
        "loss": losses,
        "seconds": round(time.perf_counter() - start, 1),
        "device": device,
    }
    if c.patch_weight:
        record["patch_accuracy"] = patch_accuracy(model.eval(), heads.eval(), seed=c.seed)
    return model.cpu().eval(), record


@torch.inference_mode()
def patch_accuracy(model, heads, n: int = 100, seed: int = 0) -> dict[str, float]:
    """How well the patch objective's read-out names, per attribute, what most of each held-out patch shows
    (patches mostly covered by an object only: the background is the easy part)."""
    images, _, _, scenes = draw_batch(np.random.default_rng([seed, 1]), n)
    hidden = model.vision_model(pixel_values=pixels(images).to(model.device), output_hidden_states=True)
    logits = heads(hidden.hidden_states[PATCH_LAYER][:, 1:]).float().cpu()
    targets, out, start = patch_targets(scenes), {}, 0
    for attr, classes in PATCH_CLASSES.items():
        part = slice(start, start + len(classes))
        start += len(classes)
        mostly = targets[..., part][..., 1:].max(-1).values > 0.5  # every patch for a scene attribute
        hits = logits[..., part].argmax(-1) == targets[..., part].argmax(-1)
        out[attr] = round(hits[mostly].float().mean().item(), 4)
    return out


@torch.inference_mode()
def zero_shot(model, n: int = 100, seed: int = 0) -> dict[str, float]:
    """Zero-shot accuracy on `n` held-out scenes (drawn from the seed stream [seed, 1], never trained on).

    - retrieval: each image's best caption among the `n` captions is its own (chance 1/n);
    - binding: each image scores its caption above its hard negative (chance 1/2).
    """
    images, positives, negatives, _ = draw_batch(np.random.default_rng([seed, 1]), n)
    model = model.eval()
    image = _embedding(model.get_image_features(pixel_values=pixels(images)))
    text = _embedding(model.get_text_features(**tokenize(positives + negatives)))
    sims = image @ text.T  # (n, 2n)
    target = torch.arange(n)
    return {
        "retrieval": round((sims[:, :n].argmax(1) == target).float().mean().item(), 4),
        "binding": round((sims[target, target] > sims[target, target + n]).float().mean().item(), 4),
        "chance_retrieval": round(1 / n, 4),
        "n": n,
    }


def _embedding(out) -> torch.Tensor:
    # transformers 5 returns the projected embedding as the output's pooler_output, 4.x the tensor itself
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


def write_pretrained_clip(
    folder: Path, c: cfg.ClipConfig, progress: Callable[[str], None] | None = None
) -> None:
    """Pretrain the twin and write it into `folder` in openai's layout, with its vocabulary and record."""
    model, record = pretrain(c, progress)
    record["zero_shot"] = zero_shot(model, seed=c.seed)
    if progress:
        z = record["zero_shot"]
        progress(
            f"CLIP zero-shot on {z['n']} held-out scenes: retrieval {z['retrieval']:.0%} (chance "
            f"{z['chance_retrieval']:.0%}), caption over its hard negative {z['binding']:.0%} "
            "(chance 50%)"
        )
    save_clip(model, folder)
    (folder / VOCAB_FILE).write_text(json.dumps({w: i for i, w in enumerate(VOCAB)}, indent=1))
    (folder / RECORD_FILE).write_text(json.dumps(record))


def load(folder: str | Path):
    """The pretrained twin as a CLIPModel (eval mode), from a folder `write_pretrained_clip` wrote."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder).eval()


def record(folder: str | Path) -> dict:
    """What the pretraining recorded: settings, loss per step, zero-shot accuracy, seconds."""
    return json.loads((Path(folder) / RECORD_FILE).read_text())


def save_clip(model, folder: Path) -> None:
    """Write a CLIPModel as openai's repo has it: pytorch_model.bin (both towers), config, preprocessor."""
    from .processing import image_processor_class

    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # openai's format, not safetensors
    model.config.save_pretrained(folder)
    image_processor = image_processor_class()(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    image_processor.save_pretrained(folder)
