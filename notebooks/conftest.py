"""`pytest --nbmake notebooks/`: the kernels inherit this environment, so every notebook's parameter
cell picks the offline profile and its small budgets (see llava_nb.config.in_test)."""

import os

os.environ["LLAVA_NB_IN_TEST"] = "1"
