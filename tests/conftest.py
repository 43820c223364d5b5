"""pytest's configuration; the helpers the tests share are in ``helpers.py``."""

import ncps_mlx  # noqa: F401  (imported before mlx.core, as users import it)
