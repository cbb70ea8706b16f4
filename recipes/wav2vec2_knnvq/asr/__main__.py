from recipes.wav2vec2_knnvq.asr.recipe import main

main()
