"""Run folders: the files a zero-shot or fine-tuning run leaves behind, and the only thing reports read. Light.

Split by concern: `names` (run names, fingerprints, log rows), `lock` (rsg.lock), `claim` (one configuration per
folder), `folder` (the RunFolder reader/writer; its docstring has the layout and the API), `provenance` (what
produced a run). The public names are re-exported here: `from rsg_eval.runs import RunFolder` keeps working.
"""

from rsg_eval.runs.claim import LEGACY_KEYS, Claim, claim_folder, settings_diff
from rsg_eval.runs.folder import RunFolder, ZipResult, item_from_row
from rsg_eval.runs.lock import FolderLock, is_main_process
from rsg_eval.runs.names import (DEFAULT_ROOT, LOCK_NAME, PARTIAL_ZIP_NAME, RESULT_NAMES, RUN_MARKER, SPLITS,
                                 ZIP_NAME, check_run_path, default_run_name, files_fingerprint, fingerprint, log_row,
                                 run_path)

__all__ = ["DEFAULT_ROOT", "LEGACY_KEYS", "LOCK_NAME", "PARTIAL_ZIP_NAME", "RESULT_NAMES", "RUN_MARKER", "SPLITS",
           "ZIP_NAME", "Claim", "FolderLock", "RunFolder", "ZipResult", "check_run_path", "claim_folder",
           "default_run_name", "files_fingerprint", "fingerprint", "is_main_process", "item_from_row", "log_row", "run_path", "settings_diff"]
