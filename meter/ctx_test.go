package meter

import "context"

type optsKey struct{}

func withOptions(ctx context.Context, o Options) context.Context {
	return context.WithValue(ctx, optsKey{}, o)
}

func optionsFrom(ctx context.Context) Options {
	o, _ := ctx.Value(optsKey{}).(Options)
	return o
}
