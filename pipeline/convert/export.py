"""Export one checkpoint of a pipeline run as a standard Hugging Face model directory.

The result holds config.json of the run's base model, the tokenizer files of the run's tokenizer
with the chat template the run's chat data was rendered with (run.json `chat_template`; the
tokenizer's own only when the run trained on no chat data: template.py), generation_config.json
stopping at that template's end of turn,
safetensors weights (sharded with an index above --max-shard-size) in the base checkpoint's dtype
(--dtype to choose), and export.json, which names the source file and sha256 of every tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import hf
from .hf_files import check_tokenizer
from .output import check_out_not_input, output_dtype, write_model
from .shards import DEFAULT_SHARD_SIZE, parse_size
from .sources import RunSource
from .template import of_source


def export_run(
    run_dir,
    out,
    step: int | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    dtype: str = "auto",
) -> dict:
    """Write RUN's checkpoint (latest complete, or `step`) to `out` as an HF directory; return export.json."""
    max_bytes = parse_size(max_shard_size)
    src = RunSource(run_dir, step, "RUN", "--step")
    out = Path(out)
    check_out_not_input(out, [src.path, src.model_dir, src.tokenizer_dir])
    check_tokenizer(src.tokenizer_dir, f"RUN {src.path} (run.json config.tokenizer)")
    out_dtype = output_dtype(dtype, src.config)
    recorded = (src.run.get("base_model") or {}).get("fingerprint")
    if recorded and hf.model_identity(src.model_dir)["fingerprint"] != recorded:
        # Only config.json and the tokenizer are taken from there, and every tensor's name and shape
        # is checked against that config, so this is worth a warning, not a refusal.
        print(
            f"warning: {src.model_dir} has changed since the run started (run.json base_model."
            f"fingerprint differs); config.json and the tokenizer are copied from it as it is now",
            file=sys.stderr,
        )
    template = of_source(src)
    if template.text is None and src.run.get("phase") == "chat":
        print(
            f"warning: {src.path} trained a chat model but neither run.json nor its tokenizer "
            f"({src.tokenizer_dir}) has a chat template; the export has none",
            file=sys.stderr,
        )
    return write_model(
        out,
        [(i, src) for i in range(src.num_layers)],
        config=src.config,
        model_dir=src.model_dir,
        tokenizer_dir=src.tokenizer_dir,
        dtype=out_dtype,
        max_bytes=max_bytes,
        force=force,
        tool="export",
        record={"input": src.describe()},
        template=template,
    )
