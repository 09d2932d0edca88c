"""Prompts: the text of the user message per family and the one family-independent way to turn it
into a full prompt (the processor's chat template around one image and the text)."""
from __future__ import annotations

#: Text of the user message per family (the chat template wraps it); the bundled captioner's own
#: prompt ("caption") overrides this for that model.
DEFAULT_PROMPTS = {
    "llava": "Describe this image in one sentence.",
    "llava_next": "Describe this image in one sentence.",
    "qwen2_vl": "Describe this image in one sentence.",
    "idefics3": "Describe this image in one sentence.",
    "internvl": "Describe this image in one sentence.",
    "paligemma": "caption en",  # no chat template: the processor adds the image tokens
    "blip2": "",  # plain image captioning: no prompt
}
FALLBACK_PROMPT = "Describe this image in one sentence."
TINY_PROMPT = "caption"  # the prompt scripts/train_captioner.py trained the bundled model on
TINY_MAX_NEW_TOKENS = 24  # its captions are six words
MAX_NEW_TOKENS = 64


def build_prompt(processor, prompt: str) -> str:
    """The full text prompt for one image: the chat template around ``prompt``."""
    image_token = getattr(processor, "image_token", None)
    if image_token and image_token in prompt:
        return prompt  # already a complete prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt
