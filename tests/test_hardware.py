"""vlmlab.hardware: virtual boxes, the no-GPU machine, NVML (faked) and CUDA_VISIBLE_DEVICES."""
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from vlmlab import hardware
from vlmlab.hardware import GB, GiB, Gpu, Hardware, gpus, parse_size, visible_nvml_indices



# ---- virtual specs -----------------------------------------------------------------------------

def test_two_by_24gib():
    hw = gpus("2x24GiB")
    assert hw.source == "virtual" and hw.virtual and len(hw) == 2 and bool(hw)
    assert [g.index for g in hw] == [0, 1]
    assert [g.device for g in hw] == [0, 1]
    assert [g.label for g in hw] == ["GPU0", "GPU1"]
    for g in hw:
        assert g.total == g.free == 24 * 1024**3 and g.used == 0
        assert g.kind == "virtual" and not hw.is_cpu


def test_gb_is_decimal_and_gib_binary():
    assert gpus("24GB")[0].total == 24_000_000_000
    assert gpus("24GiB")[0].total == 25_769_803_776  # 24 * 1024**3
    assert gpus("24G")[0].total == 24 * 1024**3  # a bare G means GiB, as nvidia-smi shows it
    assert gpus("24")[0].total == 24 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5TB") == 1_500_000_000_000
    assert parse_size(" 80 GiB ") == 80 * 1024**3


def test_named_card():
    (g,) = gpus("a100-40gb")
    assert g.name == "A100 40GB" and g.total == g.free == 40 * GiB
    assert g.bandwidth == 1555


def test_mixed_cards_keep_their_order():
    hw = gpus("h100-80gb,rtx3090")
    assert [g.name for g in hw] == ["H100 80GB", "GeForce RTX 3090"]
    assert [g.total for g in hw] == [80 * GiB, 24 * GiB]
    assert [g.index for g in hw] == [0, 1]


def test_count_of_named_cards_and_decimal_h200():
    hw = gpus("4xh200")
    assert len(hw) == 4 and [g.index for g in hw] == [0, 1, 2, 3]
    assert {g.total for g in hw} == {141 * GB}  # the data sheet's 141 GB are decimal: 131.3 GiB
    assert {g.name for g in hw} == {"H200 141GB"}


def test_counts_and_spaces_and_aliases():
    hw = gpus("2 x A100, 1x24GiB")
    assert [g.total for g in hw] == [80 * GiB, 80 * GiB, 24 * GiB]  # "a100" is the 80 GB card
    assert [g.index for g in hw] == [0, 1, 2]


def test_cpu_slots():
    hw = gpus("2xcpu")
    assert len(hw) == 2 and hw.is_cpu
    assert [g.device for g in hw] == ["cpu", "cpu"]
    assert [g.label for g in hw] == ["cpu0", "cpu1"]
    assert hw[0].total > 0 and hw[0].total == hw[1].total
    sized = gpus("2xcpu:8GiB")
    assert [g.total for g in sized] == [8 * GiB, 8 * GiB]


def test_gpus_passes_hardware_through():
    hw = gpus("2x24GiB")
    assert gpus(hw) is hw


def test_unknown_card_suggests_the_close_ones():
    with pytest.raises(ValueError) as err:
        gpus("a100-50gb")
    msg = str(err.value)
    assert "unknown GPU 'a100-50gb'" in msg
    assert "Did you mean" in msg and "a100-80gb" in msg and "a100-40gb" in msg
    assert "24GiB" in msg  # and how to give a size instead


def test_unknown_card_without_close_match_still_lists_known_cards():
    with pytest.raises(ValueError, match="unknown GPU") as err:
        gpus("potato")
    assert "Did you mean" not in str(err.value)
    assert "h100-80gb" in str(err.value)


@pytest.mark.parametrize("bad", ["24 parsecs", "24GX", "x24GiB"])
def test_bad_size_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match="size such as '24GiB'"):
        gpus(bad)


def test_parse_size_error_says_how_to_write_a_size():
    with pytest.raises(ValueError, match=r"cannot read 'lots' as a memory size; write e\.g\. '24GiB'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        gpus("cpu:lots")


@pytest.mark.parametrize("bad", ["0x24GiB", "0xh100"])
def test_zero_count(bad):
    with pytest.raises(ValueError, match="count of devices must be at least 1"):
        gpus(bad)


@pytest.mark.parametrize("bad", ["0GiB", "2x0GB", "cpu:0GiB"])
def test_zero_size(bad):
    with pytest.raises(ValueError, match="memory size above zero"):
        gpus(bad)


@pytest.mark.parametrize("bad", ["", "   ", ",,"])
def test_empty_spec(bad):
    with pytest.raises(ValueError):
        gpus(bad)


def test_cpu_and_gpu_do_not_mix():
    with pytest.raises(ValueError, match="mixes CPU slots and GPUs"):
        gpus("2xcpu,a100")


# ---- select, by_index, display ------------------------------------------------------------------

@pytest.fixture
def box():
    """Four GPUs of different free memory (as a busy real machine would have)."""
    devs = [Gpu(0, "A", 80 * GiB, 10 * GiB), Gpu(1, "B", 80 * GiB, 70 * GiB),
            Gpu(2, "C", 80 * GiB, 30 * GiB), Gpu(3, "D", 80 * GiB, 75 * GiB)]
    return Hardware(devs, "nvml")


def test_select_indices(box):
    sub = box.select(indices=[3, 1])
    assert [g.index for g in sub] == [1, 3]  # machine order, not the order asked
    assert sub.source == "nvml"
    with pytest.raises(ValueError, match=r"no device with index \[7\]"):
        box.select(indices=[1, 7])


def test_select_min_free(box):
    assert [g.index for g in box.select(min_free=30 * GiB)] == [1, 2, 3]
    assert [g.index for g in box.select(min_free="50GiB")] == [1, 3]
    empty = box.select(min_free="100GiB")
    assert not empty and "no device matches" in empty.message


def test_select_n_takes_the_most_free(box):
    assert [g.index for g in box.select(n=2)] == [1, 3]
    assert [g.index for g in box.select(n=3)] == [1, 2, 3]
    assert [g.index for g in box.select(indices=[0, 1, 2], min_free="20GiB", n=1)] == [1]


def test_by_index(box):
    assert box.by_index(2).name == "C"
    assert box.by_index(9) is None
    cpu = gpus("2xcpu")
    assert cpu.by_index("cpu") is cpu[0] and cpu.by_index(1) is cpu[1]


def test_repr_html_lists_every_device(box):
    html = box._repr_html_()
    assert html.count("<tr>") == 1 + 4  # header + one row per device
    for label in ("GPU0", "GPU1", "GPU2", "GPU3"):
        assert label in html
    assert "10.0 GiB" in html and "75.0 GiB" in html and "80.0 GiB" in html
    assert "4 device(s), nvml" in html
    # the used-memory bar of GPU0 is 70/80 full
    assert "width:88%" in html


def test_repr_html_of_empty_hardware_says_why():
    html = Hardware([], "none", "no driver <here>")._repr_html_()
    assert "No GPU" in html and "no driver &lt;here&gt;" in html


def test_to_pandas(box):
    df = box.to_pandas()
    assert list(df["index"]) == [0, 1, 2, 3]
    assert list(df["free"]) == [10 * GiB, 70 * GiB, 30 * GiB, 75 * GiB]
    assert {"name", "total", "free", "kind", "utilization", "bandwidth", "nvml_index"} <= set(df.columns)
    assert list(gpus("2x24GiB").to_pandas()["total"]) == [24 * GiB, 24 * GiB]


def test_to_dicts_are_json():
    d = gpus("a100-40gb").to_dicts()
    assert json.loads(json.dumps(d))[0]["total"] == 40 * GiB


# ---- the no-GPU machine --------------------------------------------------------------------------

_NO_NVML = r"""
import sys, json
sys.modules["pynvml"] = None  # as on a machine without nvidia-ml-py: import pynvml raises ImportError
import vlmlab
hw = vlmlab.gpus()
print(json.dumps({"n": len(hw), "bool": bool(hw), "source": hw.source, "message": hw.message,
                  "html": hw._repr_html_(), "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""


def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_gpu_gives_empty_hardware_with_a_message_and_no_torch():
    r = _run(_NO_NVML)
    assert r["n"] == 0 and r["bool"] is False and r["source"] == "none"
    assert "No GPU found" in r["message"] and "2x24GiB" in r["message"]
    assert "No GPU" in r["html"]
    assert r["torch"] is False, "gpus() must not import torch when torch is not imported yet"
    assert r["transformers"] is False


def test_gpus_on_this_machine_does_not_raise_nor_import_torch():
    r = _run(_NO_NVML.replace('sys.modules["pynvml"] = None', "pass"))
    assert r["torch"] is False
    if r["n"] == 0:  # this test machine: no NVML / no driver
        assert r["source"] == "none" and r["message"]


# ---- NVML, faked --------------------------------------------------------------------------------

class FakeNvml(types.ModuleType):
    """A pynvml stand-in for three GPUs; records init/shutdown."""

    def __init__(self, cards=None, init_error=None):
        super().__init__("pynvml")
        self.cards = cards if cards is not None else [
            # (name, uuid, total, free, util)
            ("NVIDIA A100-SXM4-40GB", "GPU-aaaa1111-0000", 40 * GiB, 39 * GiB, 5),
            (b"NVIDIA H100 80GB HBM3", b"GPU-bbbb2222-0000", 80 * GiB, 60 * GiB, None),  # bytes, as old pynvml
            ("NVIDIA L40S", "GPU-cccc3333-0000", 48 * GiB, 47 * GiB, 99),
        ]
        self.init_error, self.inited, self.shut = init_error, 0, 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inited += 1

    def nvmlShutdown(self):
        self.shut += 1

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetUUID(self, h):
        return self.cards[h[1]][1]

    def nvmlDeviceGetName(self, h):
        return self.cards[h[1]][0]

    def nvmlDeviceGetMemoryInfo(self, h):
        _, _, total, free, _ = self.cards[h[1]]
        return SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetUtilizationRates(self, h):
        util = self.cards[h[1]][4]
        if util is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=util, memory=0)


@pytest.fixture
def nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_nvml_all_visible(nvml):
    hw = gpus()
    assert hw.source == "nvml" and not hw.virtual
    assert [g.index for g in hw] == [0, 1, 2]
    assert [g.nvml_index for g in hw] == [0, 1, 2]
    assert [g.name for g in hw] == ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", "NVIDIA L40S"]  # bytes decoded
    assert [g.uuid for g in hw] == ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]
    assert [(g.total, g.free) for g in hw] == [(40 * GiB, 39 * GiB), (80 * GiB, 60 * GiB), (48 * GiB, 47 * GiB)]
    assert [g.utilization for g in hw] == [5.0, None, 99.0]  # unsupported utilisation is None, not an error
    assert {g.kind for g in hw} == {"cuda"}
    assert hw[1].used == 20 * GiB
    assert nvml.inited == 1 and nvml.shut == 1  # NVML is shut down again


def test_nvml_bandwidth_from_the_data_sheet(nvml):
    # "A100" must not be read as "A10", nor "L40S" as "L4"
    assert [g.bandwidth for g in gpus()] == [1555, 3350, 864]


def test_nvml_cuda_visible_devices_reorders(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    hw = gpus()
    assert [g.index for g in hw] == [0, 1]  # torch's numbering
    assert [g.nvml_index for g in hw] == [2, 0]
    assert [g.name for g in hw] == ["NVIDIA L40S", "NVIDIA A100-SXM4-40GB"]
    assert [g.free for g in hw] == [47 * GiB, 39 * GiB]


def test_nvml_cuda_visible_devices_by_uuid(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb2222, GPU-aaaa")  # UUID prefixes, a space after the comma
    hw = gpus()
    assert [g.nvml_index for g in hw] == [1, 0]
    assert [g.uuid for g in hw] == ["GPU-bbbb2222-0000", "GPU-aaaa1111-0000"]


def test_nvml_nothing_visible(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hw = gpus()
    assert len(hw) == 0 and hw.source == "none"
    assert "NVML sees no GPU visible to this process" in hw.message
    assert nvml.shut == 1


def test_nvml_init_failure_is_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(init_error=RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED")))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(hardware, "_from_torch", lambda: None)  # torch may be imported by other tests
    hw = gpus()
    assert len(hw) == 0 and hw.source == "none" and "No GPU found" in hw.message


def test_nvml_select_keeps_torch_indices(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0,1")
    hw = gpus()
    sub = hw.select(min_free="45GiB")  # torch 0 = L40S (47 free), torch 2 = H100 (60 free)
    assert [(g.index, g.nvml_index) for g in sub] == [(0, 2), (2, 1)]
    assert [g.index for g in hw.select(n=1)] == [2]


UUIDS = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000", "GPU-dddd4444-0000"]


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2, 3]),
    ("2,0", [2, 0]),
    ("3", [3]),
    ("", []),
    (" 1 , 2 ", [1, 2]),
    ("GPU-cccc3333-0000,GPU-aaaa", [2, 0]),
    ("1,GPU-dddd", [1, 3]),
    ("0,7,1", [0]),  # CUDA stops at the first invalid entry
    ("1,abc,0", [1]),
    ("-1", []),
    ("GPU-", []),  # an ambiguous UUID prefix is invalid
    ("1,1,2", [1]),  # a repeated device stops the list
    ("MIG-x", []),
])
def test_visible_nvml_indices(visible, expected):
    assert visible_nvml_indices(visible, UUIDS) == expected


@pytest.mark.parametrize("name, bandwidth", [("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-PCIE-40GB", 1555),
                                             ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA L40S", 864), ("NVIDIA L4", 300),
                                             ("Tesla V100-SXM2-16GB", 900), ("Unknown Accelerator", None)])
def test_bandwidth_of_real_card_names_prefers_the_matching_memory_size(name, bandwidth):
    from vlmlab.hardware import bandwidth_of

    assert bandwidth_of(name) == bandwidth
