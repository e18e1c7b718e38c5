"""Click commands, one module per feature; wiring only (the work lives in the library modules).

Commands are imported when invoked (``cli._Group`` resolves them lazily), so a header-only command
such as ``info`` does not pay for importing torch.
"""

from __future__ import annotations

# name → "module:attribute", in the order `lora-inspect --help` lists them
COMMANDS: dict[str, str] = {
    "info": "lora_inspect.commands.inspect:info",
    "rank": "lora_inspect.commands.inspect:rank",
    "truncate": "lora_inspect.commands.rewrite:truncate",
    "rescale": "lora_inspect.commands.rewrite:rescale",
    "convert": "lora_inspect.commands.algebra:convert",
    "fit": "lora_inspect.commands.fit:fit",
    "merge": "lora_inspect.commands.algebra:merge",
    "extract": "lora_inspect.commands.extract:extract",
    "footprint": "lora_inspect.commands.footprint:footprint",
    "check": "lora_inspect.commands.check:check",
    "diff": "lora_inspect.commands.report:diff",
    "report": "lora_inspect.commands.report:report",
    "scan": "lora_inspect.commands.scan:scan",
    "train": "lora_inspect.train.cli:train",
    "verify": "lora_inspect.train.cli:verify",
}
