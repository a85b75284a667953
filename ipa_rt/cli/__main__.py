"""``python -m ipa_rt.cli``, as it ran when the CLI was one module."""

import sys

from . import main

sys.exit(main())
