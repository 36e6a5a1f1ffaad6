"""Integrations with training stacks. Each submodule imports its framework lazily: ``import fastloss`` never
requires them."""
