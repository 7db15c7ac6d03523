"""Everything the tests and the benchmarks share, as one importable package (`tests.kit`):

    tokenizers  tiny real tokenizers (SentencePiece, byte-level BPE) and corpora, trained locally
    models      tiny model configs of the real families, written by the product's one factory
                (pipeline.hf.save_random_model), so they load through a user's code path
    runs        hand-built run directories that follow the run-directory contract exactly
    train       a real tiny training setup (tokenizer, model, packed shards, configs) and launchers
    reference   the plain PyTorch training loop the pipeline must match (parity) and is timed against
    oracles     readers that tests compare against: checkpoint tensors, optimizer state, generation
    faults      kill/pause injection for the reliability tests, installed around the real entry point
    cli         `call`: an entry point's main(argv) in this process, held to the clean-error contract

Nothing here is imported by the product.
"""
