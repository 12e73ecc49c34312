"""`pytest --nbmake notebooks/`: the kernels inherit this environment, so every notebook's parameter
cell picks the offline profile and its small budgets (see llava_nb.config.in_test), and the run folder
is a temporary one shared by this session's notebooks (06 and 07 find 05's exports there) and removed
afterwards: test exports never land where a user's notebook would pick them up."""

import atexit
import os
import shutil
import tempfile

os.environ["LLAVA_NB_IN_TEST"] = "1"
os.environ["LLAVA_NB_OUTPUTS"] = tempfile.mkdtemp(prefix="llava_nb-test-outputs-")  # llava_nb.runs.OUTPUTS_ENV
atexit.register(shutil.rmtree, os.environ["LLAVA_NB_OUTPUTS"], ignore_errors=True)
