"""Speech data: LibriSpeech layout, audio checks, fairseq-style manifests."""
