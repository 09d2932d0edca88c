#!/usr/bin/env python
"""Train vlmlab's bundled tiny LLaVA captioner on synthetic shape scenes (CPU only).

Builds everything locally (no hub access): a word-level tokenizer trained with
`tokenizers`, a PIL-backend CLIP image processor, a LlavaProcessor with a chat
template, and a `LlavaForConditionalGeneration` (tiny CLIP vision tower +
2-layer MLP projector + tiny Llama).  Trains on freshly generated scenes from
`vlmlab.assets.scenes`, evaluates greedy captions on held-out scenes, then saves the
model, processor and a model card with `save_pretrained`.

    python scripts/train_captioner.py                     # full run -> vlmlab/models/tiny-captioner
    python scripts/train_captioner.py --smoke --out /tmp/x # a few steps, < 60 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmlab.assets import scenes as synth  # noqa: E402

DEFAULT_OUT = REPO / "vlmlab" / "assets" / "tiny-captioner"
TRAIN_SEED = 1234  # the scene stream used for training is default_rng(seed)
EVAL_SEED = 777_001  # held-out scenes for the final evaluation (never used for training)
IMAGE_SIZE = 64
PATCH_SIZE = 8
PROMPT_TEXT = "caption"
CHAT_TEMPLATE = (
    "{{- '<s>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}{%- else -%}{{- ' ASSISTANT: ' -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image> ' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_TEXT}]}]


def seed_everything(seed: int, device: str = "cpu") -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed for determinism on CUDA only
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")


# --------------------------------------------------------------------------- building blocks
def build_tokenizer():
    """Word-level tokenizer trained with `tokenizers` on the caption grammar + prompt words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    corpus = [f"USER: {PROMPT_TEXT} ASSISTANT:"]
    for kind in synth.KINDS:
        for colour in synth.COLOURS:
            for position in synth.POSITIONS:
                for n in (1, 2, 3):
                    corpus.append(synth.caption_for([{"kind": kind, "colour": colour, "position": position}] * n))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=128,
    )


def build_processor(tokenizer, patch_size=PATCH_SIZE):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # +CLS, dropped by "default"
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=args.vision_dim, intermediate_size=args.vision_dim * 2, num_hidden_layers=args.vision_layers,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=args.patch_size, num_channels=3,
        projection_dim=args.vision_dim, hidden_act="gelu", attention_dropout=0.0,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_dim, intermediate_size=args.text_dim * 2,
        num_hidden_layers=args.text_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // args.patch_size) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 10
    return model


# --------------------------------------------------------------------------- data
def encode_batch(processor, scenes):
    """(pixel_values, input_ids, labels) for teacher forcing; labels are -100 except on caption + </s>."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    prompt_ids = processor(images=scenes[0][0], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    pixel = np.stack([np.asarray(img, dtype=np.float32) for img, _, _ in scenes])  # B,H,W,3 uint8 range
    pixel_values = torch.from_numpy((pixel / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    rows, labels = [], []
    for _, caption, _ in scenes:
        target = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt_ids + target)
        labels.append([-100] * len(prompt_ids) + target)
    assert len({len(r) for r in rows}) == 1, "all captions have six words, so no padding is needed"
    return pixel_values, torch.tensor(rows), torch.tensor(labels)


def check_encoding_matches_processor(processor, scenes):
    """The fast path in `encode_batch` must equal what the processor produces for a full chat."""
    pixel_values, input_ids, _ = encode_batch(processor, scenes[:4])
    for i, (img, caption, _) in enumerate(scenes[:4]):
        chat = MESSAGES + [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]
        text = processor.apply_chat_template(chat)
        ref = processor(images=img, text=text, return_tensors="pt")
        assert torch.equal(ref["input_ids"][0], input_ids[i]), (text, ref["input_ids"][0], input_ids[i])
        assert processor.tokenizer.unk_token_id not in input_ids[i], text
        assert torch.allclose(ref["pixel_values"][0], pixel_values[i], atol=1e-5)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_captions(model, processor, images, batch_size=100):
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
        inputs = inputs.to(model.device)
        gen = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        out += processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
    return [c.strip() for c in out]


def score(predictions, scenes):
    """Exact caption match, per-object kind+colour accuracy and per-field accuracies."""
    exact = objects = objects_ok = 0
    fields = {"count": 0, "colour": 0, "kind": 0, "position": 0}
    for pred, (_, ref, objs) in zip(predictions, scenes):
        exact += pred == ref
        p, r = synth.parse_caption(pred) or {}, synth.parse_caption(ref)
        for k in fields:
            fields[k] += p.get(k) == r[k]
        for o in objs:
            objects += 1
            objects_ok += (p.get("kind"), p.get("colour")) == (o["kind"], o["colour"])
    n = len(scenes)
    return {"n": n, "exact_match": exact / n, "object_kind_colour_acc": objects_ok / objects,
            **{f"{k}_acc": v / n for k, v in fields.items()}}


# --------------------------------------------------------------------------- model card
CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags: [llava, tiny, synthetic, captioning, vlmlab]
---

# vlmlab tiny-captioner

A tiny captioning vision-language model that ships inside `vlmlab` so that users
with no GPU and no network get real captions.  It is a native transformers
**LLaVA** model (`LlavaForConditionalGeneration`): a tiny CLIP vision tower, the
LLaVA two-layer MLP multi-modal projector and a tiny Llama decoder, trained from
scratch on synthetic scenes of coloured shapes from `vlmlab.assets.scenes`.  It only knows
that world; on real photos its output is meaningless.

Date: 2026-11-21.  Requires **transformers>=5.17** (saved with transformers {tf_version},
torch {torch_version}); loads with `AutoProcessor` / `AutoModelForImageTextToText`.
No torchvision needed: the image processor is CLIP's PIL backend (saved as `CLIPImageProcessor`;
with torchvision installed, transformers picks the torchvision backend, which gives the same pixels
for these 64x64 inputs).  The saved files were checked to load, and to give the same captions, under
transformers 5.17.0 as well.

## Architecture

| part | config |
|---|---|
| vision tower | `CLIPVisionModel`: image {image}x{image}, patch {patch} -> {tokens} patch tokens (+CLS, dropped: `vision_feature_select_strategy="default"`), hidden {vd}, {vl} layers, 4 heads, MLP {vi}, `vision_feature_layer=-1` |
| projector | `LlavaMultiModalProjector`: Linear({vd}->{td}) + GELU + Linear({td}->{td}) |
| language model | `LlamaModel` + LM head tied to the embeddings: hidden {td}, {tl} layers, 4 heads (4 KV heads), MLP {ti}, vocab {vocab} |
| parameters | {params:,} total ({vparams:,} vision, {pparams:,} projector, {lparams:,} language), float32 safetensors ({mb:.1f} MB) |

Tokenizer: word-level, trained locally with `tokenizers` on the caption grammar plus
the prompt words; special tokens `<pad> <unk> <s> </s> <image>`.

## Data

Synthetic scenes from `vlmlab.assets.scenes.make_scene` ({image}x{image} RGB): one group of 1-3
identical shapes (circle, square, triangle, cross) in one of 6 colours (red, green,
blue, yellow, purple, black) in the left, center or right third of the image, over a
plain, gradient or noisy pale background.  Caption grammar (always six words):

    COUNT COLOUR NOUN PLACE
    COUNT  = a | two | three
    NOUN   = circle(s) | square(s) | triangle(s) | cross(es)
    PLACE  = on the left | in the center | on the right

e.g. "two red circles on the left".  Training scenes are drawn fresh every step from
`numpy.random.default_rng({train_seed})` ({n_train:,} scenes seen); evaluation scenes
come from `default_rng({eval_seed})`.

## Prompt and usage

The model expects exactly this prompt (= `processor.apply_chat_template(messages,
add_generation_prompt=True)` with one image and the text "{prompt_text}"):

    {prompt!r}

The processor expands `<image>` to {tokens} image tokens.

```python
from transformers import AutoProcessor, AutoModelForImageTextToText
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder)
processor.tokenizer.padding_side = "left"  # decoder-only batching
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "{prompt_text}"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
captions = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
```

## Training

    {command}

AdamW (lr {lr}, betas 0.9/0.98, weight decay {wd}), {warmup} warmup steps then cosine decay,
batch {batch}, {steps} steps, gradient clipping 1.0, loss only on the caption tokens and `</s>`
(labels -100 on the prompt and image tokens), all weights trained from scratch, deterministic
(`torch.use_deterministic_algorithms(True)`, fixed seeds, torch threads: {threads}).
Wall time: **{train_min:.1f} min training** ({total_min:.1f} min including evaluation and saving;
{cpu_min:.1f} min of process CPU time) on {machine}.  The machine was shared with other jobs, so
wall time on an idle machine may be lower.

## Evaluation

Greedy decoding on {n_eval} freshly generated held-out scenes (`default_rng({eval_seed})`, never used for training):

| metric | value |
|---|---|
| exact caption match | **{exact:.1%}** |
| per-object kind+colour accuracy | {obj:.1%} |
| count accuracy | {count:.1%} |
| colour accuracy | {colour:.1%} |
| kind accuracy | {kind:.1%} |
| position accuracy | {position:.1%} |
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_card(out: Path, model, processor, args, metrics, timing, command):
    import transformers

    cfg = model.config
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    params = count(model)
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    machine = f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU"
    text = CARD.format(
        tf_version=transformers.__version__, torch_version=torch.__version__,
        image=IMAGE_SIZE, patch=cfg.vision_config.patch_size, tokens=cfg.image_seq_length,
        vd=cfg.vision_config.hidden_size, vl=cfg.vision_config.num_hidden_layers,
        vi=cfg.vision_config.intermediate_size, td=cfg.text_config.hidden_size,
        tl=cfg.text_config.num_hidden_layers, ti=cfg.text_config.intermediate_size,
        vocab=cfg.text_config.vocab_size, params=params, vparams=count(model.model.vision_tower),
        pparams=count(model.model.multi_modal_projector), lparams=count(model.model.language_model),
        mb=weights / 1e6, train_seed=args.seed, n_train=args.steps * args.batch_size, eval_seed=args.eval_seed,
        prompt_text=PROMPT_TEXT, prompt=processor.apply_chat_template(MESSAGES, add_generation_prompt=True),
        command=command, lr=args.lr, wd=args.weight_decay, warmup=args.warmup_steps, batch=args.batch_size,
        steps=args.steps, threads=torch.get_num_threads(), train_min=timing["train_s"] / 60,
        total_min=timing["total_s"] / 60, cpu_min=timing["cpu_s"] / 60, machine=machine, n_eval=metrics["n"], exact=metrics["exact_match"],
        obj=metrics["object_kind_colour_acc"], count=metrics["count_acc"], colour=metrics["colour_acc"],
        kind=metrics["kind_acc"], position=metrics["position_acc"],
    )
    (out / "README.md").write_text(text)


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT}; a temp dir with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2500; 8 with --smoke)")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed for init and the training scene stream")
    p.add_argument("--eval-n", type=int, default=None, help="held-out scenes to evaluate (default 500; 16 with --smoke)")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    p.add_argument("--smoke", action="store_true", help="a handful of steps into a temp dir (< 60 s), for tests")
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--vision-dim", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-dim", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=PATCH_SIZE)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core box 2 threads oversubscribe and crawl; "
                        "deterministic per thread count, other counts differ only by float rounding)")
    p.add_argument("--device", default="cpu", help="cpu (the shipped model) or e.g. cuda for quick experiments")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=0, help="quick greedy eval on 100 scenes every N steps (0: off)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.smoke else 2500
    if args.eval_n is None:
        args.eval_n = 16 if args.smoke else 500
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="tiny-captioner-smoke-")) if args.smoke else DEFAULT_OUT
    return args


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(["python scripts/train_captioner.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny attention probabilities otherwise turn into slow denormals on CPU
    seed_everything(args.seed, args.device)

    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, args.patch_size)
    model = build_model(tokenizer, args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; vocab {len(tokenizer)}; {model.config.image_seq_length} image tokens")

    rng = np.random.default_rng(args.seed)
    check_encoding_matches_processor(processor, [synth.make_scene(np.random.default_rng(0)) for _ in range(4)])
    eval_scenes = synth.make_dataset(args.eval_n, args.eval_seed, IMAGE_SIZE)
    quick_scenes = synth.make_dataset(100, args.eval_seed + 1, IMAGE_SIZE)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warmup = args.warmup_steps = min(args.warmup, max(args.steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(max(s + 1 - warmup, 0) / max(args.steps - warmup, 1), 1.0)))))

    model.train()
    t_train = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        scenes = [synth.make_scene(rng, IMAGE_SIZE) for _ in range(args.batch_size)]
        pixel_values, input_ids, labels = (t.to(args.device) for t in encode_batch(processor, scenes))
        loss = model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            k = args.log_every if step % args.log_every == 0 else step % args.log_every
            print(f"step {step:5d}  loss {running / k:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - t_train:7.1f}s", flush=True)
            running = 0.0
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            m = score(generate_captions(model, processor, [s[0] for s in quick_scenes]), quick_scenes)
            print(f"   quick eval @ {step}: exact {m['exact_match']:.1%}  " + "  ".join(
                f"{k} {v:.0%}" for k, v in m.items() if k.endswith("_acc")), flush=True)
            model.train()
    train_s = time.perf_counter() - t_train
    print(f"training wall time: {train_s:.1f} s ({train_s / 60:.2f} min) for {args.steps} steps; "
          f"process CPU time so far {time.process_time():.0f} s")

    model.eval()
    t_eval = time.perf_counter()
    preds = generate_captions(model, processor, [s[0] for s in eval_scenes])
    metrics = score(preds, eval_scenes)
    print(f"held-out eval ({metrics['n']} scenes, seed {args.eval_seed}) in {time.perf_counter() - t_eval:.1f} s:")
    print(f"  exact caption match      {metrics['exact_match']:.1%}")
    print(f"  per-object kind+colour   {metrics['object_kind_colour_acc']:.1%}")
    print("  " + "  ".join(f"{k} {v:.1%}" for k, v in metrics.items() if k.endswith("_acc")))
    for pred, (_, ref, _) in list(zip(preds, eval_scenes))[:5]:
        print(f"  ref {ref!r:40} pred {pred!r}")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out)
    processor.save_pretrained(out)
    (out / "eval_results.json").write_text(json.dumps(
        {**metrics, "eval_seed": args.eval_seed, "train_seed": args.seed, "steps": args.steps,
         "train_wall_s": round(train_s, 1), "params": n_params}, indent=2) + "\n")

    # Round trip through the Auto classes, as users will load it.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc2 = AutoProcessor.from_pretrained(out)
    model2 = AutoModelForImageTextToText.from_pretrained(out).eval()
    check = eval_scenes[:8]
    again = generate_captions(model2, proc2, [s[0] for s in check])
    assert again == preds[:8] or args.device != "cpu", (again, preds[:8])
    print(f"reloaded {type(model2).__name__} + {type(proc2).__name__} from {out}: captions identical")

    timing = {"train_s": train_s, "total_s": time.perf_counter() - t_start, "cpu_s": time.process_time()}
    write_card(out, model, processor, args, metrics, timing, command)
    print(f"total wall time: {timing['total_s']:.1f} s; saved to {out}")
    return metrics


if __name__ == "__main__":
    main()
