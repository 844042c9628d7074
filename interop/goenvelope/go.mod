module eventbus/interop/goenvelope

go 1.19
