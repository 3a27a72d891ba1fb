"""The synthetic world the organisms live in: dialogues and chat formats, tasks and a knowledge
base, a tiny code language with a checker, pirate speech, the tokenizer, the two backdoors, and the
deterministic training mixtures and held-out evaluation splits."""
