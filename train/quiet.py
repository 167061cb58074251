"""Drop the two log lines an installed torchao makes every process print, and nothing else.

diffusers imports torchao whenever it is installed (the `quant` extra, in `dev`), and that import logs
"Unable to import `torchao` Tensor objects" (diffusers' safe-globals list names classes torchao 0.18 no longer has)
and one torch `_pytree` deprecation line per torchao enum. Neither concerns us: we never load torchao-serialised
checkpoints, and torchao's registrations still work. Filters on those two loggers, matched on the message, keep every
other warning they log.
"""

import logging

_DROPPED = {
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Idempotent: a logger keeps one filter per message."""
    for name, text in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
