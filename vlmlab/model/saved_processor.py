"""A model's saved processor (folder or Hub id), loaded so that image captioning needs no torchvision.

``load_processor(source)`` is ``AutoProcessor.from_pretrained(source)``. The processors of
Qwen2-VL, Qwen2.5-VL, InternVL, SmolVLM and LLaVA-OneVision also hold a video processor, and in
transformers every video processor needs torchvision; the processor's argument check even looks
``video_processor`` up in a registry that is a torchvision placeholder, so ``video_processor=None``
fails too. torchvision wheels are pinned to one torch release each, and PyPI's CPU torch often has
none that imports next to it. When ``AutoProcessor`` fails for that reason only, the same processor
class is built from the same files (its tokenizer, image processor, processor config and chat
template) with :func:`no_video_processor` in the video slot: images work exactly as with the full
processor, and video input raises an ImportError that says what to install.
"""
from __future__ import annotations


def load_processor(source, trust_remote_code: bool = False, **kwargs):
    """The processor saved at ``source``: ``AutoProcessor``'s, or the same class without its video
    part where that part needs torchvision (see the module docstring)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (ImportError, AttributeError, ValueError) as err:
        if trust_remote_code or not _is_missing_torchvision(err):
            raise
        return _image_only_processor(source, _first_line(err), **kwargs)


def no_video_processor(reason: str):
    """A stand-in for a video processor that cannot be built here: transformers' own
    ``BaseVideoProcessor`` (which needs no torchvision), so the processor saves, prints and copies
    as usual, with every call refused."""
    from transformers.video_processing_utils import BaseVideoProcessor

    class NoVideoProcessor(BaseVideoProcessor):
        def __call__(self, *args, **kwargs):
            raise ImportError(f"video input needs this model's video processor, which could not be loaded "
                              f"({reason}); install the torchvision build that matches your torch")

        preprocess = __call__

    return NoVideoProcessor()


def _is_missing_torchvision(err) -> bool:
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return False
    text = str(err)
    return "torchvision" in text.lower() or "VIDEO_PROCESSOR_MAPPING" in text


def _first_line(err) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _processor_class(source, **kwargs):
    """The processor class ``source`` names (processor_config.json), else the one transformers
    registers for its model_type."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor_dict, _ = transformers.ProcessorMixin.get_processor_dict(source, **kwargs)
    name = processor_dict.get("processor_class")
    if name is None:
        name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(source, **kwargs).model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{source}: cannot tell its processor class (its files name {name!r})")
    return cls


def _image_only_processor(source, reason: str, **kwargs):
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = _processor_class(source, **kwargs)
    stand_in = no_video_processor(reason)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is stand_in:
            return type(argument)
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    # the same class, under the same name, but accepting the stand-in in the video slot
    image_only = type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class,
                                             "__module__": cls.__module__, "__doc__": cls.__doc__})
    args = []
    for attribute in cls.get_attributes():
        if "video" in attribute:
            args.append(stand_in)
        elif attribute == "tokenizer":
            args.append(AutoTokenizer.from_pretrained(source, **kwargs))
        elif attribute == "image_processor":
            args.append(AutoImageProcessor.from_pretrained(source, **kwargs))
        else:
            raise ImportError(f"{source}: {cls.__name__} needs a {attribute} besides its video processor, and "
                              f"the video processor needs torchvision ({reason})")
    processor_dict, init_kwargs = image_only.get_processor_dict(source, **kwargs)
    return image_only.from_args_and_dict(args, processor_dict, **init_kwargs)
