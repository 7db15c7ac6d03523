"""data_prep: raw corpora and chat conversations -> memory-mapped token shards. Knows nothing of training.

    python -m data_prep raw   documents -> token shards + manifest            (raw.py, corpus.py)
    python -m data_prep chat  conversations -> token shards + loss masks      (chat.py, template.py)

What the rest of the project reads from here:
    reader.py     training windows out of the shards (the trainer's data source)
    manifest.py   the file that says a shard set is complete and what is in it
    template.py   the chat template: rendering, where assistant turns lie, the end-of-turn token
    errors.py     UserError and fail_cleanly: one `error:` line and a known exit code, for every tool
    files.py      JSON lines, crash-safe writes, one writer per output, writability checks

Import rule: data_prep imports nothing from pipeline or bench; pipeline and bench may import any
of the modules above. errors.py and files.py are the project's shared helpers because they have
no dependency but the standard library.
"""
