"""Import every built-in proxy module so that each registers itself."""
from __future__ import annotations

import models.proxies.cost  # noqa: F401
import models.proxies.fgnas  # noqa: F401
import models.proxies.grad_norm  # noqa: F401
import models.proxies.jacob_cov  # noqa: F401
import models.proxies.naswot  # noqa: F401
import models.proxies.snip  # noqa: F401
import models.proxies.synflow  # noqa: F401
import models.proxies.tenas  # noqa: F401
import models.proxies.zen  # noqa: F401
import models.proxies.zico  # noqa: F401
