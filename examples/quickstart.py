"""Compile a ViT-S/16 and the real MiniLM-L6 with backend="effopt"; print speed against eager and what
effopt did. Run with `make demo`."""
import logging
import time
import warnings

# transformers probes the installed torchao (the benchmarks' int8 baseline), which logs its CUDA-only
# extensions and enum registrations: not effopt's output
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import effopt  # noqa: E402
from effopt.testing import minilm  # noqa: E402
from effopt.testing.models import vit_small  # noqa: E402
from effopt.timing import interleaved_medians  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning, module="torch")
hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar when MiniLM loads


def show(name, model, args):
    t0 = time.perf_counter()
    fast = torch.compile(model, backend="effopt")  # no options needed; backend found via entry point
    with torch.inference_mode():
        out, ref = fast(*args), model(*args)
        compile_s = time.perf_counter() - t0
        ref_t = ref if isinstance(ref, torch.Tensor) else ref.last_hidden_state
        out_t = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        err = (out_t - ref_t).abs().max().item()
        t = interleaved_medians({"eager": model, "effopt": fast}, args, rounds=10)
    print(f"\n== {name}: eager {t['eager'] * 1e3:.1f} ms, effopt {t['effopt'] * 1e3:.1f} ms "
          f"-> {t['eager'] / t['effopt']:.2f}x   (compile {compile_s:.1f} s, max |diff| vs eager {err:.1e})")
    print(effopt.last_report())


def main():
    torch.manual_seed(0)
    show("ViT-S/16 224, batch 1", vit_small().eval(), (torch.randn(1, 3, 224, 224),))
    model, tok = minilm.load()
    ids, mask = minilm.encode(tok, minilm.SENTENCES[:1], length=128)
    show("MiniLM-L6 (real weights), sequence 128", model, (ids, mask))


if __name__ == "__main__":
    main()
