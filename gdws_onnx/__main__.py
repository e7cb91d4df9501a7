from gdws_onnx.cli import main

main()
