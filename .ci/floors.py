"""Print ``name==floor`` for each package named on the command line, read from pyproject.toml's
``>=`` lower bounds, so the compatibility step always tests the oldest versions we claim."""

import re
import sys
import tomllib
from pathlib import Path

deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
    "dependencies"
]
for name in sys.argv[1:]:
    spec = next(d for d in deps if re.match(rf"{re.escape(name)}\b", d))
    print(f"{name}=={re.search(r'>=([0-9.]+)', spec).group(1)}")
