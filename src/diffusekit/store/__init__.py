"""Run storage: a run folder on disk, one concept a file.

  lock.py      RunLock: one writer per run folder (RUN/.lock, portable, pid of the holder)
  files.py     atomic file I/O (replace_atomically, write_text_atomic, write_weights_atomic), the
               weights format (content hash, read_weights, load_state_dict_checked), the errors
  journal.py   the save journal: save_checkpoint replaces config, weights and trainer state as one
               set; recover finishes or discards an interrupted save (its docstring: the protocol)
  readers.py   read_checkpoint / read_trainer_state / read_config_json: the last committed save,
               consistent while a trainer writes the next one
  history.py   RUN/checkpoint-STEP/ folders and the folder a resume reads
  configs.py   the run folder's config.json schemas (diffusion, autoencoder, classifier runs)
  adapter.py   a LoRA adapter folder: adapter.json, its weights, the base's reference and hash check
               (not re-exported here: import diffusekit.store.adapter)
  hub.py       resolve_folder: a Hub repo id in the local HF cache as its snapshot folder; hub_repo_id

`from diffusekit import store` gives the public names of all of them (store.save_checkpoint, ...).
"""
from diffusekit.store.files import (HASH_KEY, RESTORE, CheckpointError, CheckpointWriteError, content_hash,
                                    load_state_dict_checked, os_error_line, read_weights, replace_atomically,
                                    save_file, state_dict_mismatch, weights_step, write_text_atomic,
                                    write_weights_atomic)
from diffusekit.store.history import HISTORY_PREFIX, checkpoint_history, resume_folder, snapshot_checkpoint
from diffusekit.store.journal import (COMMIT_ORDER, CONFIG_FILE, EMA_FILE, RAW_FILE, READY_DIR, STATE_FILE, TMP_DIR,
                                      recover, save_checkpoint)
from diffusekit.store.lock import LOCK_FILE, RunLock, RunLockedError
from diffusekit.store.readers import (Checkpoint, committed_files, has_checkpoint, read_checkpoint, read_config_json,
                                      read_trainer_state)

__all__ = ["COMMIT_ORDER", "CONFIG_FILE", "EMA_FILE", "HASH_KEY", "HISTORY_PREFIX", "LOCK_FILE", "RAW_FILE",
           "READY_DIR", "RESTORE", "STATE_FILE", "TMP_DIR", "Checkpoint", "CheckpointError", "CheckpointWriteError",
           "RunLock", "RunLockedError", "checkpoint_history", "committed_files", "content_hash", "has_checkpoint",
           "load_state_dict_checked", "os_error_line", "read_checkpoint", "read_config_json", "read_trainer_state",
           "read_weights", "recover", "replace_atomically", "resume_folder", "save_checkpoint", "save_file",
           "snapshot_checkpoint", "state_dict_mismatch", "weights_step", "write_text_atomic", "write_weights_atomic"]
