"""SenseVoiceSmall encoder with the VITA-Audio-Plus MLP adapter."""
