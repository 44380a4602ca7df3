"""MNN's own LLM exporter (PyPI `llmexport`), run in a process of its own with every outside effect refused.

Run as `python -m exporters.mnn.llmexport_child REQUEST.json`. The request names a Hugging Face folder, the
destination, llmexport's quantization arguments and the model's RoPE frequencies; the child writes MNN's
LLM-engine folder there (llm.mnn, llm.mnn.weight, llm_config.json, config.json, tokenizer.mtok, ...) and exits 0,
or prints `llmexport-child-error: <reason>` last and exits 3.

Why a child process, and what it guards against (MNN 3.6.1 / llmexport 0.0.5, read in their sources):
- llmexport imports its helpers as the top-level package `utils`, rewrites `sys.argv`, redirects fd 1 and appends to
  `./.export.log`: none of that may touch the toolkit's own process.
- Its converter step imports `MNN.tools.mnnconvert`, whose logger runs `pip install aliyun-log-python-sdk` at import
  and uploads each conversion's arguments and /etc/machine-id to Alibaba's servers. Here `MNN.tools` is a stub whose
  `mnnconvert.main()` calls the converter extension `_tools.mnnconvert` directly (what MNN.tools wraps), so the
  logger's module is never imported.
- An audit hook refuses, in this process, any socket, any child process (pip included) and any read of a machine id:
  a refused attempt fails the export with the event's name rather than passing silently.
- transformers is held offline and `trust_remote_code` is forced off: the folder is one the toolkit wrote, with no
  code of its own, and nothing in it may run.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path

ERROR_PREFIX = "llmexport-child-error:"
REFUSED_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.bind", "subprocess.Popen",
                  "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "urllib.Request",
                  "webbrowser.open")
MACHINE_IDS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class Refused(PermissionError):
    pass


def _audit(event: str, args: tuple) -> None:
    if event in REFUSED_EVENTS:
        raise Refused(f"MNN's exporter attempted {event} {str(args)[:200]}, which the toolkit refuses")
    if event == "open" and args and str(args[0]) in MACHINE_IDS:
        raise Refused(f"MNN's exporter attempted to read {args[0]}, which the toolkit refuses")


def _stub_mnn_tools() -> None:
    """`from MNN.tools import mnnconvert; mnnconvert.main()` runs the converter extension, never MNN's logger."""
    import MNN  # noqa: F401  (the parent package, so the stub can sit under it)

    def main() -> None:
        import _tools  # the wheel's converter extension (top-level module)

        _tools.mnnconvert(["MNNConvert"] + sys.argv[1:])

    tools = types.ModuleType("MNN.tools")
    convert = types.ModuleType("MNN.tools.mnnconvert")
    convert.main = main
    tools.mnnconvert = convert
    tools.__path__ = []  # a package with nothing else to import from
    sys.modules["MNN.tools"] = tools
    sys.modules["MNN.tools.mnnconvert"] = convert


def _no_remote_code() -> None:
    """llmexport passes trust_remote_code=True to every transformers loader; force it off."""
    import transformers

    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def from_pretrained(klass, *args, _original=original, **kwargs):
            kwargs["trust_remote_code"] = False
            return _original(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(from_pretrained)


def _llmexport_module():
    """llmexport's main module, its own directory first on the path (its `from utils.x import ...` needs it)."""
    import importlib.util

    spec = importlib.util.find_spec("llmexport")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llmexport")
    sys.path.insert(0, list(spec.submodule_search_locations)[0])
    sys.modules.pop("llmexport", None)
    import llmexport as module  # now its llmexport.py, not the package

    return module


def export(request: dict) -> None:
    module = _llmexport_module()
    import argparse

    parser = argparse.ArgumentParser()
    module.build_args(parser)
    args = parser.parse_args(["--path", request["hf_dir"]])
    for key, value in request["args"].items():
        setattr(args, key, value)
    args.export = "mnn"
    args.dst_path = request["dest"]
    args.mnnconvert = str(Path(request["dest"]) / "no-such-binary")  # the pymnn path: our stub, never a shell
    # LlmExporter directly: llmexport's export() picks an embedding-model exporter when 'bge' is in the path
    exporter = module.LlmExporter(args)
    if request.get("rope"):
        set_rope(exporter.model.rotary, request["rope"])
    exporter.export("mnn")


def set_rope(rotary, rope: dict) -> None:
    """The model's own RoPE frequencies, as the toolkit's reference computes them: llmexport 0.0.5 ignores llama3
    and linear scaling. Its graph computes cos/sin from position_ids x `theta`, times `attention_scaling` when
    `is_scaled`; every decoder layer holds this one Rotary object."""
    import torch

    theta = torch.tensor(rope["inv_freq"], dtype=torch.float32)
    if getattr(rotary, "is_mrope", False) or tuple(theta.shape) != tuple(rotary.theta.shape):
        raise ValueError(f"llmexport's RoPE has {tuple(rotary.theta.shape)} frequencies, the model "
                         f"{tuple(theta.shape)}")
    rotary.theta = theta
    rotary.attention_scaling = float(rope["attention_scaling"])
    rotary.is_scaled = rotary.attention_scaling != 1.0


def main(argv: list[str]) -> int:
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    sys.addaudithook(_audit)
    try:
        request = json.loads(Path(argv[0]).read_text())
        _stub_mnn_tools()
        _no_remote_code()
        os.chdir(request["dest"])  # its .export.log lands in the destination, removed by the parent
        export(request)
    except SystemExit as e:  # llmexport's spinner prints the traceback and calls exit(1) on any failure
        if e.code:
            print(f"{ERROR_PREFIX} MNN's exporter stopped (exit status {e.code}); its output is above", flush=True)
            return 3
    except ModuleNotFoundError as e:
        print(f"{ERROR_PREFIX} missing module {e.name}", flush=True)
        return 3
    except BaseException as e:  # noqa: BLE001 - the parent reports every failure as the export's reason
        traceback.print_exc()
        print(f"{ERROR_PREFIX} {type(e).__name__}: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
