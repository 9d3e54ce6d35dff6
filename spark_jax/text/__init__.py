"""Text rules both stages share: think stripping, answer extraction, verdict markers and parsers, the RM prompt."""
