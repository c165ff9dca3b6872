"""The built-in methods. Each is a folder whose ``__init__`` registers it (:mod:`peftkit.registry`);
adding a method is a new folder plus one line here (and its ``PeftType`` member and public export).

Importing ``peftkit`` imports this list, so every built-in method is registered before any config
is parsed or model built.
"""

from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import bottleneck  # noqa: F401
from . import bitfit  # noqa: F401
from . import partial  # noqa: F401
from . import ln_tuning  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import p_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import trainable_tokens  # noqa: F401
