"""Prompts: the text of the user message per family, and the one family-independent way from
images and that text to the model's inputs (:func:`caption_inputs`).

The question becomes one user message ``[image, text]`` rendered with the chat template and its
generation prompt: the processor's template, else its tokenizer's (``Blip2Processor`` drops the
template at load while its tokenizer keeps it). A processor without any template gets the question
as it is and inserts the image tokens itself (PaliGemma, BLIP-2); a question that already holds
the image token is used verbatim. The texts are tokenized with left padding (decoder-only
batching: the new tokens follow every prompt directly) and without a second BOS where the template
wrote one (Gemma 3, Llama 3.2 Vision). Images go in as one list per prompt, ``[[im1], [im2], ...]``,
the layout every processor reads as "one image for each text" (Idefics and Mllama need it nested).
"""
from __future__ import annotations

#: The user message where a family's checkpoints were trained on something other than an
#: instruction (by model_type; the spec's family name). They ship no chat template either.
DEFAULT_PROMPTS = {
    "paligemma": "caption en",  # PaliGemma's captioning task prefix; the processor adds image tokens and BOS
    "blip-2": "",  # BLIP-2 captions from the image alone
}
#: every other family: an instruction, wrapped by the model's chat template (the bundled captioner's
#: own prompt, "caption", overrides this for that model)
FALLBACK_PROMPT = "Describe this image in one sentence."
TINY_PROMPT = "caption"  # the prompt scripts/train_captioner.py trained the bundled model on
TINY_MAX_NEW_TOKENS = 24  # its captions are six words
MAX_NEW_TOKENS = 64


def build_prompt(processor, prompt: str) -> str:
    """The full text prompt for one image: the chat template around ``prompt``."""
    image_token = getattr(processor, "image_token", None)
    if image_token and str(image_token) in prompt:
        return prompt  # already a complete prompt
    template = chat_template_of(processor)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    return prompt  # the processor inserts the image tokens (PaliGemma, BLIP-2)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def chat_template_of(processor) -> str | None:
    """The processor's chat template, else its tokenizer's (``Blip2Processor`` keeps none itself)."""
    return getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)


def caption_inputs(processor, images: list, prompt: str):
    """The processor's inputs (PyTorch tensors) for one ``prompt`` per image, padded on the left."""
    if not images:
        raise ValueError("caption_inputs needs at least one image")
    text = build_prompt(processor, prompt)
    tokenizer = tokenizer_of(processor)
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # e.g. Llama tokenizers ship without one
    bos = getattr(tokenizer, "bos_token", None)
    return processor(images=[[im] for im in images], text=[text] * len(images), return_tensors="pt", padding=True,
                     padding_side="left", add_special_tokens=not (bos and text.startswith(bos)))
