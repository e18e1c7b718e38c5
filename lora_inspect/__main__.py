"""``python -m lora_inspect``: the same CLI as the ``lora-inspect`` script."""

from .cli import main

if __name__ == "__main__":
    main()
