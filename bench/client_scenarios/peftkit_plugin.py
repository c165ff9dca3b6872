"""pytest plugin: `-p peftkit_plugin` installs peftkit as `peft` before any test module is imported."""
import peftkit

peftkit.install_as_peft()
