from recipes.wav2vec2_knnvq.asr.eval.recipe import main

main()
