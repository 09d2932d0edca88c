"""Which modules a profiler hooks, and on which device each sits, from the model's roles."""
from __future__ import annotations

import itertools
import weakref

from vlmlab.observe.hooks import Target
from vlmlab.observe.sampler import device_key


def role_devices(root, roles) -> set:
    """Devices of the modules that play a role (embeddings and norm included; the first parameter
    of each): where the model sits, without walking every parameter of a big model."""
    out = set()
    for names in roles.values():
        for n in names:
            mod = _submodule(root, n)
            if mod is not None:
                out.add(_module_device(mod))
    return out


def _submodule(root, name):
    try:
        return root.get_submodule(name)
    except AttributeError:  # a parameter (query_tokens, image_newline) or a name absent here
        return None


def _module_device(module):
    hook = getattr(module, "_hf_hook", None)
    ex = getattr(hook, "execution_device", None)
    if ex is not None:
        return device_key(ex)
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return device_key(t.device)
    return "cpu"


_ROLES_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def roles_of(module) -> dict:
    try:
        return _ROLES_CACHE[module]
    except (KeyError, TypeError):
        pass
    roles = _find_roles(module)
    try:
        _ROLES_CACHE[module] = roles
    except TypeError:
        pass
    return roles


def _find_roles(module) -> dict:
    from vlmlab.model.families import family_for
    from vlmlab.model.introspect import read_roles

    config = getattr(module, "config", None)
    if config is None:
        raise ValueError("this module has no config to find its vision tower and decoder layers by; "
                         "pass roles={'vision': [...], 'layers': [...], 'head': [...]} (as ModelSpec.roles)")
    names = {n for n, _ in module.named_modules() if n}
    names |= {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return read_roles(module, {r: list(v) for r, v in family_for(config, names).roles.items()})


def hook_targets(root, roles, detail) -> tuple[list[Target], list]:
    found = {n: m for names in roles.values() for n in names if (m := _submodule(root, n)) is not None}
    targets: list[Target] = []
    vision_names = [n for n in roles.get("vision", []) if n in found]
    for n in vision_names:
        targets.append(Target("vision", n, found[n], _module_device(found[n])))
    for n in roles.get("projector", []):
        if n in found:  # some projector entries are parameters (query_tokens, image_newline)
            nested = any(n.startswith(v + ".") for v in vision_names)
            targets.append(Target("projector", n, found[n], _module_device(found[n]), nested=nested))
    layers = []
    for n in roles.get("layers", []):
        if n not in found:
            continue
        for child, mod in found[n].named_children():
            if child.isdigit():
                layers.append((f"{n}.{child}", mod))
    layer_devices = [_module_device(mod) for _, mod in layers]
    i = 0
    while i < len(layers):  # runs of consecutive layers on one device
        j = i
        while j + 1 < len(layers) and layer_devices[j + 1] == layer_devices[i]:
            j += 1
        if detail == "layers":
            cell = [None, -1]
            for k in range(i, j + 1):
                targets.append(Target("layers", layers[k][0], layers[k][1], layer_devices[k], layer=k,
                                       first=k == i, last=k == j, cell=cell))
        else:  # one clock over the whole run
            targets.append(Target("layers", f"{layers[i][0]}..{layers[j][0]}", layers[i][1], layer_devices[i],
                                   layer=j, post_module=layers[j][1] if j > i else None))
        i = j + 1
    for n in roles.get("head", []):
        if n in found:
            targets.append(Target("head", n, found[n], _module_device(found[n])))
    return targets, layer_devices
