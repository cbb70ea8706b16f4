from recipes.wav2vec2_knnvq.ssl.recipe import main

main()
