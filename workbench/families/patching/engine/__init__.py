"""The engine backend: patching computed from a checkpoint's weights as plain functions
(`interp.decoder`), batched over every patched index and running only the suffix a patch changes."""
