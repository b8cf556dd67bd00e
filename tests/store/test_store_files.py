"""store.files.os_error_line: the OS's errors get path, reason and fix; a message written for the user stays as it is."""
import errno

from diffusekit.store.files import os_error_line


def test_an_os_error_names_the_path_and_the_fix():
    line = os_error_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/config.json"))
    assert line.startswith("runs/x/config.json: No such file or directory;")


def test_a_message_written_for_the_user_is_kept():
    # e.g. gradio's "Cannot find empty port in range: 7860-7860": a generic path/permission/disk hint would mislead
    said = "Cannot find empty port in range: 7860-7860. Set --port to a free port."
    assert os_error_line(OSError(said)) == said
