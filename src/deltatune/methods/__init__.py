"""Built-in methods; importing this package registers their configs and injectors."""

from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import bottleneck  # noqa: F401
from . import prompt  # noqa: F401
from . import prefix  # noqa: F401
from . import adaption_prompt  # noqa: F401
from . import lycoris  # noqa: F401
from . import vera  # noqa: F401
from . import adalora  # noqa: F401
from . import oft  # noqa: F401
from . import boft  # noqa: F401
