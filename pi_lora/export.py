"""`pi-lora export`: a run's adapter in forms other tools load (a clean PEFT folder for now)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import model, run
from .errors import PiLoraError

FORMATS = ("peft",)

SNIPPET = '''```python
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained("{base}")
# The adapter was trained with Position Interpolation; without this the model breaks past {original_len} tokens.
config.rope_parameters = {rope_parameters}
config.max_position_embeddings = {target_len}
model = AutoModelForCausalLM.from_pretrained("{base}", config=config)
model = PeftModel.from_pretrained(model, "{folder}")
```
'''


def export_peft(run_dir: Path, output: Path, overwrite: bool = False) -> Path:
    """The adapter, its rope setting (pi_lora.json) and a README that shows how to load both."""
    meta = run.read_meta(run_dir)
    adapter = run_dir / run.ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise PiLoraError(f"no adapter in '{run_dir}': the run has not finished (see its checkpoints/).")
    if output.exists() and not overwrite:
        raise PiLoraError(f"output '{output}' exists; add --overwrite to replace it.")
    base = model.ALIASES.get(meta["base"], meta["base"])
    with run.atomic_dir(output) as tmp:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / run.META).write_text(json.dumps(meta, indent=2) + "\n")
        snippet = SNIPPET.format(base=base, folder=output, original_len=meta["original_len"],
                                 target_len=meta["target_len"], rope_parameters=meta["rope_parameters"])
        (tmp / "README.md").write_text(
            f"# LoRA adapter: {base} extended to {meta['target_len']} tokens\n\n"
            f"Trained by pi-lora with Position Interpolation (rope_type `{meta['rope_type']}`, factor "
            f"{meta['factor']:g}, rope_theta {meta['rope_theta']:g}; {meta['original_len']} -> "
            f"{meta['target_len']} tokens). The rope setting is not part of a PEFT adapter, so set it on "
            f"the base config before attaching the adapter:\n\n{snippet}"
        )
    return output
